"""Model health per asset: how far its recent inputs sit from what calibration fitted for the
site (level shift in calibration deviations, spread ratio, missing inputs), where its window
scores sit against the alert threshold, and how often it raises. A slowly degrading model
shows here before it shows as missed failures.

Scores and raises are recorded by the inference thread; the rows come from the asset's row
history; the report is read by the heartbeat and /metrics."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

from edge_agent.calibration import SiteCalibration
from protos.autoglm.v1 import agent_pb2

SCORES = 600  # recent windows behind score_median and alerts_per_day
MIN_VALID = 10  # readings of a sensor before its shift is judged
MAX_SPREAD_RATIO = 100.0
MIN_SPAN_S = 3600.0  # raises per day only over at least this much stream time


class ScoreTrail:
    """The recent window scores and raise times of one asset."""

    def __init__(self) -> None:
        self._scores: deque[float] = deque(maxlen=SCORES)
        self._ends: deque[float] = deque(maxlen=SCORES)
        self._raises: deque[float] = deque(maxlen=SCORES)
        self._lock = threading.Lock()

    def add(self, score: float, window_end: float, raised: bool) -> None:
        with self._lock:
            self._scores.append(score)
            self._ends.append(window_end)
            if raised:
                self._raises.append(window_end)

    def summary(self) -> tuple[float, float]:
        """(median score, raises per day over the span of the recent windows)."""
        with self._lock:
            scores, ends, raises = list(self._scores), list(self._ends), list(self._raises)
        if not scores:
            return 0.0, 0.0
        span = ends[-1] - ends[0]
        if span < MIN_SPAN_S:  # one early raise over a few minutes is no daily rate
            return float(np.median(scores)), 0.0
        recent = sum(1 for t in raises if t >= ends[0])
        return float(np.median(scores)), recent * 86_400.0 / span


def asset_drift(
    values: np.ndarray,
    mask: np.ndarray,
    calibration: SiteCalibration,
    sensors: Sequence[str],
    trail: ScoreTrail,
) -> agent_pb2.AssetDrift:
    """The report over `values`/`mask` [rows, N] (site units) and the score trail."""
    median, per_day = trail.summary()
    report = agent_pb2.AssetDrift(score_median=median, alerts_per_day=per_day, rows=len(values))
    if values.size == 0:
        return report
    valid = mask > 0
    report.masked_fraction = float(1.0 - valid.mean())
    count = valid.sum(axis=0)
    judged = count >= MIN_VALID
    if not judged.any():
        return report
    safe = np.maximum(count, 1)
    mean = np.where(valid, values, 0.0).sum(axis=0) / safe
    var = np.where(valid, (values - mean) ** 2, 0.0).sum(axis=0) / safe
    scale = np.maximum(calibration.input_scale.astype(np.float64), 1e-9)
    shift = np.where(judged, np.abs(mean - calibration.input_center) / scale, 0.0)
    # A sensor flat in its recent rows (stuck, or a setpoint) reads as MAX_SPREAD_RATIO.
    ratio = np.clip(np.sqrt(var) / scale, 1.0 / MAX_SPREAD_RATIO, MAX_SPREAD_RATIO)
    spread = np.where(judged, np.maximum(ratio, 1.0 / ratio), 1.0)
    worst = int(np.argmax(shift))
    report.input_shift = float(shift[worst])
    report.input_shift_sensor = sensors[worst] if worst < len(sensors) else str(worst)
    report.spread_ratio = float(spread.max())
    return report
