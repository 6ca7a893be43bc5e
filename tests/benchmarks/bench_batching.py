"""Inference windows/s at 64 assets: the agent's dynamic batching vs one window per call.

Same model (a freshly trained small bundle's fp32 ONNX under ONNX Runtime), same windows,
same machine, same run; prints the ratio. Run: python tests/benchmarks/bench_batching.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.train import TrainParams
from edge_agent.batching import InferenceWorker, WindowBatch, WindowJob
from edge_agent.bundle import verify_bundle
from edge_agent.inference.base import Outputs, open_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
ASSETS = 64
ROUNDS = 30


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = ed25519.Ed25519PrivateKey.generate()
        options = TrainOptions(
            name="bench",
            version="1",
            window=120,
            calibration_rows=120,
            train=TrainParams(epochs=1, seed=0),
        )
        from tests.support.sensordata import write_dataset

        train_bundle([write_dataset(root / "data")], root / "b", options, key, log=lambda _: None)
        manifest = verify_bundle(root / "b", key.public_key())
        backend = open_backend("onnxruntime", root / "b", manifest, "fp32")
        n = len(manifest.sensors)
        rng = np.random.default_rng(0)
        windows = rng.normal(size=(ASSETS, 120, n)).astype(np.float32)
        mask = np.ones_like(windows)

        t0 = time.perf_counter()
        for _ in range(ROUNDS):
            for a in range(ASSETS):
                backend.run(windows[a : a + 1], mask[a : a + 1])
        single = ROUNDS * ASSETS / (time.perf_counter() - t0)

        done = threading.Semaphore(0)

        def finished(jobs: Sequence[WindowJob], _out: Outputs) -> None:
            for _ in jobs:
                done.release()

        worker = InferenceWorker(backend, finished, 64, 0.02)
        worker.start()
        t0 = time.perf_counter()
        for _ in range(ROUNDS):
            for a in range(ASSETS):  # every asset's window falls due at once, as each stride does
                worker.submit(WindowBatch(a, windows[a : a + 1], mask[a : a + 1], None, [0], 1.0))
            for _ in range(ASSETS):
                done.acquire()
        batched = ROUNDS * ASSETS / (time.perf_counter() - t0)
        worker.stop()
        print(f"{ASSETS} assets, window 120 x {n} sensors, ONNX Runtime fp32 on CPU")
        print(f"  one window per call : {single:10.0f} windows/s (baseline)")
        print(f"  dynamic batching    : {batched:10.0f} windows/s  = {batched / single:.1f}x")
        print(f"  batches run: {worker.batches}, mean batch {worker.windows / worker.batches:.1f}")


if __name__ == "__main__":
    main()
