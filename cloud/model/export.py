"""ONNX export with a pinned opset and a dynamic batch axis, parity-checked against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from cloud.model.net import INPUT_NAMES, OUTPUT_NAMES, SensorGraphNet
from edge_agent.inference.onnxruntime import OnnxRuntimeBackend
from edge_agent.windowing import FloatArray

OPSET = 17


def export_onnx(net: SensorGraphNet, path: Path) -> None:
    """Write `net` as ONNX (opset 17, batch axis dynamic; every op TensorRT parses)."""
    cfg = net.cfg
    window = torch.zeros(2, cfg.window, cfg.sensors)
    mask = torch.ones(2, cfg.window, cfg.sensors)
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    partial = path.with_name(path.name + ".partial")
    net.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
        # and emits a larger graph; this one gives the plain graph TensorRT parses.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (window, mask),
            str(partial),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=OPSET,
            dynamic_axes=dynamic,
            dynamo=False,
        )
    partial.replace(path)


def torch_outputs(
    net: SensorGraphNet, window: FloatArray, mask: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    with torch.inference_mode():
        p, r, c = net.eval()(torch.from_numpy(window), torch.from_numpy(mask))
    return p.numpy(), r.numpy(), c.numpy()


def parity(net: SensorGraphNet, onnx_path: Path, window: FloatArray, mask: FloatArray) -> float:
    """Max abs difference between PyTorch and ONNX Runtime over all outputs."""
    expected = torch_outputs(net, window, mask)
    actual = OnnxRuntimeBackend(onnx_path).run(window, mask)
    return max(float(np.abs(a - e).max()) for a, e in zip(actual, expected, strict=True))
