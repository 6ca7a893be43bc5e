"""Dynamic batching: windows from many assets share one inference call.

The pipeline hands on the windows of one asset cut together as one `WindowBatch` (views of
one sliding window over its rows). The worker thread takes the first waiting batch, then
gathers more until `max_batch` windows are waiting or the first has waited `max_wait_s`
(splitting a batch larger than what is left), runs the model once, and hands each window
its row of the outputs. Other work that needs the model (site calibration) runs on the same
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


@dataclass
class WindowBatch:
    """Windows of one asset cut together, already in the network's input space: window i
    ends at grid slot `slots[i]` and covers `length` slots of `period_s` up to it."""

    asset: int
    windows: FloatArray  # [B, T, N]
    masks: FloatArray  # [B, T, N]
    raw: FloatArray | None  # [B, T, N] in site units, as aligned (window capture)
    slots: list[int]
    period_s: float
    enqueued: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.slots)

    def part(self, begin: int, end: int) -> WindowBatch:
        """Windows `begin ... end - 1` (views)."""
        raw = self.raw
        return WindowBatch(
            self.asset,
            self.windows[begin:end],
            self.masks[begin:end],
            None if raw is None else raw[begin:end],
            self.slots[begin:end],
            self.period_s,
            self.enqueued,
        )

    def subset(self, keep: Sequence[int]) -> WindowBatch:
        """The windows at `keep` (copies)."""
        at = np.asarray(keep, dtype=np.intp)
        raw = self.raw
        return WindowBatch(
            self.asset,
            self.windows[at],
            self.masks[at],
            None if raw is None else raw[at],
            [self.slots[i] for i in keep],
            self.period_s,
            self.enqueued,
        )

    def jobs(self) -> list[WindowJob]:
        """One job per window (views), for the deciders."""
        asset, period, enqueued, raw = self.asset, self.period_s, self.enqueued, self.raw
        before = self.windows.shape[1] - 1
        return [
            WindowJob(
                asset,
                self.windows[i],
                self.masks[i],
                (slot - before) * period,
                slot * period,
                enqueued,
                None if raw is None else raw[i],
            )
            for i, slot in enumerate(self.slots)
        ]


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
        self._queue: queue.SimpleQueue[WindowBatch | Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        # Windows submitted (written by the submitting thread only) and taken (by the worker
        # only): their difference is what waits, without a shared counter to lock.
        self._submitted = 0
        self._taken = 0
        self.latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.batches = 0
        self.windows = 0
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: WindowBatch | Task) -> None:
        """Queues windows (from one thread: the pipeline) or a task (from any)."""
        if isinstance(job, WindowBatch):
            self._submitted += len(job)
        self._queue.put(job)

    @property
    def waiting(self) -> int:
        """Windows queued and not taken yet."""
        return max(0, self._submitted - self._taken)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        carry: WindowBatch | None = None  # the rest of a batch split at `max_batch`
        stopping = False
        while not stopping or carry is not None:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            if not isinstance(first, WindowBatch):
                self._task(first)
                continue
            batch, carry = self._fit([], 0, first)
            size = sum(len(b) for b in batch)
            deadline = first.enqueued + self.max_wait_s
            while carry is None and size < self.max_batch and not stopping:
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
                elif isinstance(item, WindowBatch):
                    batch, carry = self._fit(batch, size, item)
                    size = sum(len(b) for b in batch)
                else:  # after the windows queued before it
                    self._run_batch(batch)
                    batch = []
                    self._task(item)
                    break
            if batch:
                self._run_batch(batch)

    def _fit(
        self, batch: list[WindowBatch], size: int, item: WindowBatch
    ) -> tuple[list[WindowBatch], WindowBatch | None]:
        """`batch` with as much of `item` as fits in `max_batch`, and the rest of it."""
        room = max(1, self.max_batch - size)
        if len(item) <= room:
            return [*batch, item], None
        return [*batch, item.part(0, room)], item.part(room, len(item))

    def _task(self, task: Task) -> None:
        try:
            task(self.backend)
        except Exception:
            self.errors += 1
            log.exception("inference task failed")

    def _run_batch(self, batch: list[WindowBatch]) -> None:
        count = sum(len(b) for b in batch)
        self._taken += count
        try:
            window = np.concatenate([b.windows for b in batch])
            mask = np.concatenate([b.masks for b in batch])
            outputs = self.backend.run(window, mask)
            done = time.monotonic()
            waits = [done - b.enqueued for b in batch for _ in range(len(b))]
            self.latencies_ms.extend(w * 1000.0 for w in waits)
            if self.observe is not None:
                self.observe(waits)
            self.batches += 1
            self.windows += count
            self.on_results([job for b in batch for job in b.jobs()], outputs)
        except Exception:
            self.errors += 1
            log.exception("inference on a batch of %d windows failed", count)


def percentile(samples: Sequence[float] | deque[float], q: float) -> float:
    if not samples:
        return 0.0
    return float(np.percentile(np.fromiter(samples, dtype=np.float64), q))
