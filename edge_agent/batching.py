"""Dynamic batching: windows from many assets share one inference call.

The worker thread takes the first waiting window, then gathers more until `max_batch` are
waiting or the first has waited `max_wait_s`, runs the model once, and hands each window its
row of the outputs. Other work that needs the model (site calibration) runs on the same
thread, so the backend is only ever called from one thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.windowing import FloatArray

log = logging.getLogger(__name__)
LATENCY_SAMPLES = 4096


@dataclass
class WindowJob:
    """One window of one asset, already in the network's input space."""

    asset: int
    window: FloatArray  # [T, N]
    mask: FloatArray  # [T, N]
    window_start: float
    window_end: float
    enqueued: float = field(default_factory=time.monotonic)
    raw: FloatArray | None = None  # [T, N] in site units, as aligned (window capture)


Task = Callable[[InferenceBackend], None]
ResultHandler = Callable[[Sequence[WindowJob], Outputs], None]


class InferenceWorker:
    """Owns the backend; one thread runs every call on it."""

    def __init__(
        self,
        backend: InferenceBackend,
        on_results: ResultHandler,
        max_batch: int,
        max_wait_s: float,
        observe: Callable[[list[float]], None] | None = None,
    ) -> None:
        self.backend = backend
        self.observe = observe  # each batch's windows' seconds from cut to scored
        self.on_results = on_results
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[WindowJob | Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.batches = 0
        self.windows = 0
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: WindowJob | Task) -> None:
        self._queue.put(job)

    @property
    def waiting(self) -> int:
        """Jobs queued and not taken yet (windows, mostly)."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            if not isinstance(first, WindowJob):
                self._task(first)
                continue
            batch = [first]
            deadline = first.enqueued + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get_nowait()
                        if remaining <= 0
                        else self._queue.get(timeout=remaining)
                    )
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                if isinstance(item, WindowJob):
                    batch.append(item)
                else:
                    self._run_batch(batch)
                    batch = []
                    self._task(item)
                    break
            if batch:
                self._run_batch(batch)

    def _task(self, task: Task) -> None:
        try:
            task(self.backend)
        except Exception:
            self.errors += 1
            log.exception("inference task failed")

    def _run_batch(self, batch: list[WindowJob]) -> None:
        try:
            window = np.stack([job.window for job in batch])
            mask = np.stack([job.mask for job in batch])
            outputs = self.backend.run(window, mask)
            done = time.monotonic()
            waits = [done - job.enqueued for job in batch]
            self.latencies_ms.extend(w * 1000.0 for w in waits)
            if self.observe is not None:
                self.observe(waits)
            self.batches += 1
            self.windows += len(batch)
            self.on_results(batch, outputs)
        except Exception:
            self.errors += 1
            log.exception("inference on a batch of %d windows failed", len(batch))


def percentile(samples: Sequence[float] | deque[float], q: float) -> float:
    if not samples:
        return 0.0
    return float(np.percentile(np.fromiter(samples, dtype=np.float64), q))
