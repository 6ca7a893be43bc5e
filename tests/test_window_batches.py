"""The inference worker on batches of windows: split at `max_batch`, in order, each window
handed on with its own times, tasks after the windows queued before them."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from edge_agent.batching import InferenceWorker, WindowBatch, WindowJob
from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.windowing import FloatArray

pytestmark = pytest.mark.unit
T, N = 5, 3


class Recording(InferenceBackend):
    """Scores each window with its first value; records the batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def run(self, window: FloatArray, mask: FloatArray) -> Outputs:
        self.sizes.append(window.shape[0])
        first = window[:, 0, 0].copy()
        return first, np.zeros((len(first), N), np.float32), np.zeros((len(first), N), np.float32)


def _batch(asset: int, first_slot: int, count: int) -> WindowBatch:
    windows = np.zeros((count, T, N), np.float32)
    windows[:, 0, 0] = np.arange(first_slot, first_slot + count)
    slots = list(range(first_slot, first_slot + count))
    return WindowBatch(asset, windows, np.ones_like(windows), windows + 1, slots, 2.0)


def test_batches_are_split_at_max_batch_in_order_with_each_windows_times() -> None:
    backend = Recording()
    got: list[tuple[int, float, float, float]] = []
    ran: list[str] = []

    def on_results(jobs: Sequence[WindowJob], outputs: Outputs) -> None:
        assert len(jobs) == outputs[0].shape[0]
        for job, score in zip(jobs, outputs[0].tolist(), strict=True):
            assert job.raw is not None and job.raw[0, 0] == job.window[0, 0] + 1
            got.append((job.asset, job.window_start, job.window_end, score))

    worker = InferenceWorker(backend, on_results, max_batch=8, max_wait_s=0.05)
    held = threading.Event()
    worker.submit(lambda _backend: held.wait(10))  # everything below queues meanwhile
    worker.start()
    worker.submit(_batch(0, 100, 5))
    worker.submit(_batch(1, 200, 19))
    worker.submit(lambda _backend: ran.append(f"task after {len(got)}"))
    worker.submit(_batch(0, 105, 2))
    assert worker.waiting == 26
    held.set()
    worker.stop()
    assert backend.sizes == [8, 8, 8, 2]
    assert ran == ["task after 24"]
    expected = [(0, s) for s in range(100, 105)] + [(1, s) for s in range(200, 219)]
    expected += [(0, 105), (0, 106)]
    assert [(a, score) for a, _, _, score in got] == expected
    assert [(start, end) for a, start, end, score in got] == [
        ((score - T + 1) * 2.0, score * 2.0) for _, _, _, score in got
    ]
    assert worker.waiting == 0 and worker.windows == 26 and worker.batches == 4
