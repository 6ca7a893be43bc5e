"""Inference latency and throughput of the sensor-graph network: PyTorch eager (baseline),
ONNX Runtime fp32 and ONNX Runtime INT8 (the `model quantize` recipe), measured in one run.

    python tests/benchmarks/bench_inference.py [--sensors 8,64] [--batches 1,32] [--seconds 3]

For each N (sensors) and B (batch) prints p50/p99 latency per call, windows/s, and each
backend's speed-up over eager as a ratio (the machine is shared, so only ratios compare).
Weights are untrained (latency does not depend on them); INT8 calibrates on random windows.
Threads: 2 for every backend (the CI machine kind has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cloud.model.export import export_onnx
from cloud.model.net import NetConfig, SensorGraphNet
from cloud.model.quantize import quantize_int8
from edge_agent.inference.onnxruntime import OnnxRuntimeBackend
from edge_agent.windowing import FloatArray

WINDOW = 120


def timed(call: Callable[[], object], seconds: float) -> list[float]:
    for _ in range(5):
        call()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 20:
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def int8_model(fp32: Path, target: Path, sensors: int) -> None:
    """The `model quantize` INT8 recipe, calibrated on random windows."""
    rng = np.random.default_rng(0)
    batches = [
        {
            "window": rng.standard_normal((32, WINDOW, sensors)).astype(np.float32),
            "mask": np.ones((32, WINDOW, sensors), np.float32),
        }
        for _ in range(4)
    ]
    quantize_int8(fp32, target, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", default="8,64")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sensors.split(",")):
            torch.manual_seed(0)
            net = SensorGraphNet(NetConfig(sensors=n, window=WINDOW)).eval()
            fp32, int8 = Path(tmp) / f"{n}.fp32.onnx", Path(tmp) / f"{n}.int8.onnx"
            export_onnx(net, fp32)
            int8_model(fp32, int8, n)
            backends = {
                "onnxruntime-fp32": OnnxRuntimeBackend(fp32, threads=2),
                "onnxruntime-int8": OnnxRuntimeBackend(int8, threads=2),
            }
            for b in (int(s) for s in args.batches.split(",")):
                x = np.random.default_rng(1).standard_normal((b, WINDOW, n)).astype(np.float32)
                m = np.ones_like(x)
                tx, tm = torch.from_numpy(x), torch.from_numpy(m)

                def eager(
                    tx: torch.Tensor = tx, tm: torch.Tensor = tm, net: SensorGraphNet = net
                ) -> object:
                    with torch.inference_mode():
                        return net(tx, tm)

                runs = {"torch-eager": timed(eager, args.seconds)}
                for name, backend in backends.items():

                    def infer(
                        be: OnnxRuntimeBackend = backend, x: FloatArray = x, m: FloatArray = m
                    ) -> object:
                        return be.run(x, m)

                    runs[name] = timed(infer, args.seconds)
                base = float(np.median(runs["torch-eager"]))
                for name, samples in runs.items():
                    p50, p99 = np.percentile(samples, [50, 99])
                    row = {
                        "sensors": n,
                        "batch": b,
                        "backend": name,
                        "p50_ms": round(1e3 * p50, 3),
                        "p99_ms": round(1e3 * p99, 3),
                        "windows_per_s": round(b / p50, 1),
                        "speedup_vs_eager": round(base / p50, 2),
                    }
                    results.append(row)
                    print(
                        f"N={n:<3} B={b:<3} {name:<17} p50 {row['p50_ms']:>8.3f} ms  "
                        f"p99 {row['p99_ms']:>8.3f} ms  {row['windows_per_s']:>9.1f} win/s  "
                        f"x{row['speedup_vs_eager']:.2f} vs eager"
                    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
