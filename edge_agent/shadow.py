"""Shadow evaluation: a candidate model beside the serving one, on the same recent windows.

Each asset keeps its most recent aligned rows (`RowHistory`, filled by the pipeline thread).
An evaluation takes the latest contiguous stretch, calibrates both models on its start with
the same routine the agent and `model evaluate` use, scores the rest, and compares: how
often the two agree on "anomalous", each one's alert rate, and per-window latency measured
in the same run. The serving model's backend is only called on its inference thread.

The same evaluation measures the noise floor the gates judge against: the incumbent
calibrated on a stretch half a calibration later, on the windows both runs score out of
sample. Two sound models cannot be expected to agree better than one model agrees with
itself recalibrated (a fixed 0.9 failed two good models at 0.869 on a noisy site).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.batching import percentile
from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.scoring import SlotScores, calibrate_and_score
from edge_agent.serving import ServingModel
from edge_agent.windowing import AlignedSeries, FloatArray
from protos.autoglm.v1 import agent_pb2

MIN_FLOOR_WINDOWS = 20  # fewer windows scored by both incumbent runs: no floor measured


class RowHistory:
    """The last `capacity` aligned rows of one asset, with their grid slots: preallocated
    arrays written as a ring (about the rows' own size in memory)."""

    def __init__(self, capacity: int, sensors: int) -> None:
        self.capacity = max(0, capacity)
        self._v = np.zeros((self.capacity, sensors), dtype=np.float32)
        self._m = np.zeros((self.capacity, sensors), dtype=np.float32)
        self._slot = np.zeros(self.capacity, dtype=np.int64)
        self._written = 0  # rows ever written; the next goes to _written % capacity
        self._lock = threading.Lock()

    def extend(self, first_slot: int, values: np.ndarray, mask: np.ndarray) -> None:
        """Rows `first_slot`, `first_slot + 1`, ... (one lock per batch of closed rows)."""
        count = values.shape[0]
        if self.capacity == 0 or count == 0:
            return
        if count > self.capacity:
            first_slot += count - self.capacity
            values, mask, count = values[-self.capacity :], mask[-self.capacity :], self.capacity
        with self._lock:
            at = (self._written + np.arange(count)) % self.capacity
            self._v[at] = values
            self._m[at] = mask
            self._slot[at] = first_slot + np.arange(count)
            self._written += count

    def recent(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the kept rows' values and mask, in no particular order."""
        with self._lock:
            kept = min(self._written, self.capacity)
            return self._v[:kept].copy(), self._m[:kept].copy()

    def series(self, period_s: float) -> AlignedSeries | None:
        """The newest run of consecutive slots, or None when there is no row."""
        with self._lock:
            kept = min(self._written, self.capacity)
            order = (self._written - kept + np.arange(kept)) % max(self.capacity, 1)
            slots, values, mask = self._slot[order], self._v[order], self._m[order]
        if kept == 0:
            return None
        breaks = np.flatnonzero(np.diff(slots) != 1)
        start = int(breaks[-1]) + 1 if breaks.size else 0
        return AlignedSeries(
            start=int(slots[start]) * period_s,
            period_s=period_s,
            values=values[start:],
            mask=mask[start:],
            row_slot=np.arange(kept - start, dtype=np.int64),
        )


class _Timed:
    """Wraps a backend; records milliseconds per window of every call."""

    def __init__(self, backend: InferenceBackend) -> None:
        self.backend = backend
        self.ms_per_window: list[float] = []

    def run(self, window: FloatArray, mask: FloatArray) -> Outputs:
        started = time.perf_counter()
        out = self.backend.run(window, mask)
        self.ms_per_window.append((time.perf_counter() - started) * 1000.0 / len(window))
        return out


@dataclass(frozen=True)
class Comparison:
    windows: int
    agreement: float
    rate_candidate: float
    rate_incumbent: float
    latency_candidate_ms: float
    latency_incumbent_ms: float
    # The incumbent against itself recalibrated half a calibration later (0: not measured).
    self_agreement: float = 0.0
    self_rate_difference: float = 0.0
    self_windows: int = 0
    latency_candidate_p50_ms: float = 0.0
    latency_incumbent_p50_ms: float = 0.0
    latency_samples: int = 0  # timed batches of the side timed less often


def later(series: AlignedSeries, rows: int) -> AlignedSeries:
    """`series` without its first `rows` slots."""
    return AlignedSeries(
        start=series.start + rows * series.period_s,
        period_s=series.period_s,
        values=series.values[rows:],
        mask=series.mask[rows:],
        row_slot=np.arange(series.slots - rows, dtype=np.int64),
    )


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float]:
    """Windows, agreement and alert-rate difference over the slots both score (the last)."""
    n = min(a.size, b.size)
    if n == 0:
        return 0, 0.0, 0.0
    a, b = a[-n:], b[-n:]
    return n, float((a == b).mean()), abs(float(a.mean()) - float(b.mean()))


def compatible(candidate: ServingModel, incumbent: ServingModel) -> str:
    """Why the two cannot be compared on the same rows ("" when they can)."""
    if candidate.schema.names != incumbent.schema.names:
        return "the candidate's sensors differ from the serving model's"
    if candidate.spec.period_s != incumbent.spec.period_s:
        return "the candidate samples at another period than the serving model"
    return ""


def compare(
    candidate: ServingModel,
    incumbent: ServingModel,
    series: AlignedSeries,
    run_incumbent: Callable[[Callable[[InferenceBackend], None]], None],
) -> Comparison | None:
    """Both models on `series`; None when it is too short to calibrate and score."""
    rows = max(candidate.manifest.calibration_rows, incumbent.manifest.calibration_rows)
    if series.slots <= rows:
        return None
    timed_candidate = _Timed(candidate.backend)
    ours = calibrate_and_score(timed_candidate, candidate.frame, series, rows)
    theirs_box: list[SlotScores] = []
    timed_incumbent: list[_Timed] = []
    shift = rows // 2

    def on_inference_thread(backend: InferenceBackend) -> None:
        timed = _Timed(backend)
        timed_incumbent.append(timed)
        theirs_box.append(calibrate_and_score(timed, incumbent.frame, series, rows))
        if series.slots - shift - rows >= MIN_FLOOR_WINDOWS:  # untimed: latency unchanged
            theirs_box.append(
                calibrate_and_score(backend, incumbent.frame, later(series, shift), rows)
            )

    run_incumbent(on_inference_thread)
    if not theirs_box:
        return None
    theirs = theirs_box[0]
    a = np.asarray(ours.anomaly, dtype=bool)
    b = np.asarray(theirs.anomaly, dtype=bool)
    n = min(a.size, b.size)
    a, b = a[-n:], b[-n:]
    self_windows, self_agreement, self_difference = (
        _agreement(b, np.asarray(theirs_box[1].anomaly, dtype=bool))
        if len(theirs_box) > 1
        else (0, 0.0, 0.0)
    )
    return Comparison(
        windows=n,
        agreement=float((a == b).mean()) if n else 0.0,
        rate_candidate=float(a.mean()) if n else 0.0,
        rate_incumbent=float(b.mean()) if n else 0.0,
        latency_candidate_ms=percentile(timed_candidate.ms_per_window, 99),
        latency_incumbent_ms=percentile(timed_incumbent[0].ms_per_window, 99),
        self_agreement=self_agreement,
        self_rate_difference=self_difference,
        self_windows=self_windows,
        latency_candidate_p50_ms=percentile(timed_candidate.ms_per_window, 50),
        latency_incumbent_p50_ms=percentile(timed_incumbent[0].ms_per_window, 50),
        latency_samples=min(
            len(timed_candidate.ms_per_window), len(timed_incumbent[0].ms_per_window)
        ),
    )


def merge(parts: list[Comparison]) -> Comparison | None:
    """Window-weighted over assets."""
    total = sum(p.windows for p in parts)
    if total == 0:
        return None

    def mean(f: Callable[[Comparison], float]) -> float:
        return sum(f(p) * p.windows for p in parts) / total

    return Comparison(
        windows=total,
        agreement=mean(lambda p: p.agreement),
        rate_candidate=mean(lambda p: p.rate_candidate),
        rate_incumbent=mean(lambda p: p.rate_incumbent),
        latency_candidate_ms=max(p.latency_candidate_ms for p in parts),
        latency_incumbent_ms=max(p.latency_incumbent_ms for p in parts),
        latency_candidate_p50_ms=max(p.latency_candidate_p50_ms for p in parts),
        latency_incumbent_p50_ms=max(p.latency_incumbent_p50_ms for p in parts),
        latency_samples=min(p.latency_samples for p in parts),
        **_merged_floor(parts),
    )


def _merged_floor(parts: list[Comparison]) -> dict[str, Any]:
    """The noise floor weighted by the windows it was measured on, over assets."""
    total = sum(p.self_windows for p in parts)
    if total == 0:
        return {}
    return {
        "self_agreement": sum(p.self_agreement * p.self_windows for p in parts) / total,
        "self_rate_difference": sum(p.self_rate_difference * p.self_windows for p in parts) / total,
        "self_windows": total,
    }


def report(
    rollout_id: str, candidate: str, incumbent: str, result: Comparison | None, detail: str
) -> agent_pb2.ShadowReport:
    if result is None:
        return agent_pb2.ShadowReport(
            rollout_id=rollout_id,
            candidate_version=candidate,
            incumbent_version=incumbent,
            detail=detail or "not enough recent rows to calibrate and score both models yet",
        )
    return agent_pb2.ShadowReport(
        rollout_id=rollout_id,
        candidate_version=candidate,
        incumbent_version=incumbent,
        windows=result.windows,
        agreement=result.agreement,
        alert_rate_candidate=result.rate_candidate,
        alert_rate_incumbent=result.rate_incumbent,
        latency_p99_ms=result.latency_candidate_ms,
        incumbent_latency_p99_ms=result.latency_incumbent_ms,
        incumbent_self_agreement=result.self_agreement,
        incumbent_self_rate_difference=result.self_rate_difference,
        latency_p50_ms=result.latency_candidate_p50_ms,
        incumbent_latency_p50_ms=result.latency_incumbent_p50_ms,
        latency_samples=result.latency_samples,
    )
