"""ONNX Runtime backend (CPU; CUDA where the onnxruntime-gpu build is installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.errors import IntegrityError, InvalidInput
from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.inference.threads import compute_threads
from edge_agent.windowing import FloatArray


class OnnxRuntimeBackend(InferenceBackend):
    """One ONNX Runtime session over a verified `.onnx` file."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InvalidInput(
                "the onnxruntime backend needs onnxruntime: pip install 'open-autoglm-edge[edge]'"
            ) from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Never ONNX Runtime's default (every core, spinning): see `compute_threads`.
        options.intra_op_num_threads = compute_threads(threads)
        options.inter_op_num_threads = 1
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
            raise IntegrityError(f"{path}: ONNX Runtime cannot load it: {exc}") from None

    def run(self, window: FloatArray, mask: FloatArray) -> Outputs:
        prob, residual, contribution = self._session.run(
            None,
            {
                "window": np.ascontiguousarray(window, dtype=np.float32),
                "mask": np.ascontiguousarray(mask, dtype=np.float32),
            },
        )
        return prob, residual, contribution
