"""Window capture for retraining: which scored windows leave the device, raw, and how many.

Every window that raises an alert is captured (so an operator's later verdict labels windows
the control plane already has), and while the alert stays open every `alert_spacing`-th
window after it, up to `windows_per_alert` in all (one verdict labels them all: more than one
example of each false alarm to learn from); and a stratified sample of normal windows: by
hour of day (UTC, six 4-hour bands) and score band (five bands of 0.2 below the alert
threshold), each stratum at most `ceil(samples_per_day / 30)` windows a day, each normal
window a candidate with `sample_probability`. Near misses (normal windows scoring close to
the threshold) are rare but get the same quota as the common low scores: they are the hard
negatives.

Everything counts against `max_bytes_per_day` (encoded record bytes, per UTC day of the
windows' stream time); samples may use only `sample_share` of it, so they never crowd out
alert windows. Past the budget a window is not captured and counted (`capture_over_budget`).
The day's counts are kept in `capture.json` in the state directory, and with them how far each
open alert is in its windows (only the alerts open: an entry goes when its alert clears): a
restart, or a model swap, neither resets the budget nor captures an alert's windows again.
Only the inference thread calls it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.batching import WindowJob
from edge_agent.calibration import SiteCalibration
from edge_agent.config import CapturePolicy
from edge_agent.decisions import Verdict
from edge_agent.files import UNREADABLE, replace_atomically
from edge_agent.serving import ServingModel
from edge_agent.windowing import FloatArray

log = logging.getLogger(__name__)
HOUR_BANDS = 6  # 4-hour bands of the UTC day
SCORE_BANDS = 5  # of 0.2 each below the alert threshold (1.0)
ALERT, SAMPLE = "alert", "sample"


@dataclass(frozen=True)
class CapturedWindow:
    """One raw aligned window and what the model made of it."""

    reason: str  # ALERT or SAMPLE
    asset: str
    model_version: str
    alert_key: str
    score: float
    window_start: float  # epoch seconds of row 0; row k is at window_start + k * period_s
    period_s: float
    sensors: tuple[str, ...]
    values: FloatArray  # [T, N] site units, 0 where masked
    mask: FloatArray  # [T, N] 1 = a reading
    input_center: FloatArray  # [N] the site calibration it was scored under
    input_scale: FloatArray  # [N]
    calibration: SiteCalibration | None = None  # all of it, so the cloud can recompute evidence


@dataclass
class CaptureDay:
    """What one UTC day has captured so far."""

    day: int = -1
    bytes: int = 0
    sample_bytes: int = 0
    strata: dict[str, int] = field(default_factory=dict)


def stratum(score: float, window_end: float) -> str:
    """The sample stratum of a normal window: "<hour band>/<score band>"."""
    hour = int((window_end % 86_400) // 3600)
    band = min(SCORE_BANDS - 1, max(0, int(score * SCORE_BANDS))) if math.isfinite(score) else 0
    return f"{hour * HOUR_BANDS // 24}/{band}"


class CaptureSampler:
    """Decides which windows to capture and keeps the daily byte budget."""

    def __init__(
        self,
        policy: CapturePolicy,
        state_path: Path,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.path = state_path
        self.rng = rng or random.Random()
        self.clock = clock
        self.captured = {ALERT: 0, SAMPLE: 0}
        self.over_budget = 0
        self.quota = math.ceil(policy.samples_per_day / (HOUR_BANDS * SCORE_BANDS))
        # By asset: its open alert and the windows since it was raised (kept with the day).
        self._episodes: dict[str, tuple[str, int]] = {}
        self.today = self._load()

    def _load(self) -> CaptureDay:
        try:
            doc = json.loads(self.path.read_bytes())
            today = CaptureDay(
                int(doc["day"]),
                int(doc["bytes"]),
                int(doc["sample_bytes"]),
                {str(k): int(v) for k, v in doc["strata"].items()},
            )
        except FileNotFoundError:
            return CaptureDay()
        except UNREADABLE as exc:
            log.warning("%s: capture counts not read (%s); the day's budget starts over",
                        self.path, exc)  # fmt: skip
            return CaptureDay()
        try:  # absent in files written before it was kept
            self._episodes = {
                str(asset): (str(key), int(seen))
                for asset, (key, seen) in doc.get("episodes", {}).items()
            }
        except UNREADABLE as exc:
            log.warning("%s: open alerts' capture counts not read (%s); their windows are "
                        "counted from now", self.path, exc)  # fmt: skip
        return today

    def _day(self) -> CaptureDay:
        """The budget's day: a UTC day of this device's clock, never of the windows' stamps
        (stream times from either side of midnight, or a backlog replayed, would each start
        a fresh budget), and only ever forward (a clock stepped back keeps the day's count)."""
        day = int(self.clock() // 86_400)
        if day > self.today.day:
            self.today = CaptureDay(day)
        return self.today

    def reason_for(self, asset: str, open_key: str, score: float, window_end: float) -> str:
        """ALERT for a window of an open alert (`open_key`) that is due: the raise, then every
        `alert_spacing`-th while it stays open, up to `windows_per_alert`; SAMPLE for a normal
        window drawn for the sample (its stratum's quota not reached); "" for the others."""
        policy = self.policy
        if not policy.enabled:
            return ""
        if open_key:
            key, seen = self._episodes.get(asset, ("", 0))
            seen = seen + 1 if key == open_key else 0
            self._episodes[asset] = (open_key, seen)
            taken, off_beat = divmod(seen, policy.alert_spacing)
            return ALERT if not off_beat and taken < policy.windows_per_alert else ""
        if self._episodes.pop(asset, None) is not None:  # cleared: kept no longer
            self._save()
        if self.quota == 0 or self.rng.random() >= policy.sample_probability:
            return ""
        today = self._day()
        return SAMPLE if today.strata.get(stratum(score, window_end), 0) < self.quota else ""

    def admit(self, reason: str, size: int, score: float, window_end: float) -> bool:
        """Charges `size` encoded bytes to the day's budget; False (counted) when over it."""
        today = self._day()
        budget = self.policy.max_bytes_per_day
        over = today.bytes + size > budget
        if reason == SAMPLE:
            over = over or today.sample_bytes + size > self.policy.sample_share * budget
        if over:
            self.over_budget += 1
            return False
        today.bytes += size
        if reason == SAMPLE:
            today.sample_bytes += size
            key = stratum(score, window_end)
            today.strata[key] = today.strata.get(key, 0) + 1
        self.captured[reason] += 1
        self._save()
        return True

    def _save(self) -> None:
        t = self.today
        doc = {
            "day": t.day,
            "bytes": t.bytes,
            "sample_bytes": t.sample_bytes,
            "strata": t.strata,
            "episodes": self._episodes,
        }
        try:
            replace_atomically(self.path, json.dumps(doc).encode(), 0o600)
        except OSError as exc:  # disk full: the budget is still kept in memory
            log.warning("%s: capture counts not kept (%s)", self.path, exc)


def masked_values(values: FloatArray, mask: FloatArray) -> FloatArray:
    """Float32 values with 0 wherever no reading was (what the ring holds there is stale)."""
    return np.where(mask > 0, values, 0.0).astype(np.float32)


def captured(
    reason: str,
    alert_key: str,
    job: WindowJob,
    verdict: Verdict,
    cal: SiteCalibration,
    model: ServingModel,
) -> CapturedWindow:
    """The capture of one scored window (its raw rows must be on the job)."""
    assert job.raw is not None
    return CapturedWindow(
        reason=reason,
        asset=verdict.asset,
        model_version=model.version,
        alert_key=alert_key if reason == ALERT else "",
        score=verdict.score,
        window_start=job.window_start,
        period_s=model.spec.period_s,
        sensors=model.schema.names,
        values=job.raw,
        mask=job.mask,
        input_center=cal.input_center,
        input_scale=cal.input_scale,
        calibration=cal,
    )
