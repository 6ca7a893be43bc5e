"""From window scores to alert events: causal smoothing, then raise/clear with k-of-n debounce."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_agent.config import DecisionPolicy
from edge_agent.windowing import FloatArray

RAISED = "raised"
CLEARED = "cleared"


@dataclass(frozen=True)
class AlertEvent:
    """A fault raised on an asset, or its clearing (same `key`)."""

    kind: str
    key: str
    asset: str
    score: float
    top_sensors: tuple[tuple[str, float], ...]
    window_start: float
    window_end: float
    raised_at: float
    model_version: str
    fault: str = "anomaly"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "key": self.key,
            "asset": self.asset,
            "fault": self.fault,
            "score": round(self.score, 4),
            "top_sensors": [
                {"sensor": s, "contribution": round(c, 4)} for s, c in self.top_sensors
            ],
            "window_start": self.window_start,
            "window_end": self.window_end,
            "raised_at": self.raised_at,
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class Verdict:
    """One scored window of one asset."""

    asset: str
    score: float  # smoothed; >= 1 means fault
    raw: float
    alerting: bool  # an alert is open on the asset after this window
    contributions: dict[str, float]
    window_start: float
    window_end: float
    event: AlertEvent | None


class AssetDecider:
    """Hysteresis for one asset. Only the inference thread touches it."""

    def __init__(
        self,
        asset: str,
        sensors: tuple[str, ...],
        policy: DecisionPolicy,
        smoothing: int,
        model_version: str,
        seed: list[float] | None = None,
        open_alert: AlertEvent | None = None,
    ) -> None:
        self.asset = asset
        self.sensors = sensors
        self.policy = policy
        self.model_version = model_version
        self._raw: deque[float] = deque(seed or (), maxlen=max(1, smoothing))
        self._recent: deque[float] = deque(maxlen=policy.n)
        self.open: AlertEvent | None = open_alert  # raised before a restart, not cleared yet
        self._peak = open_alert.score if open_alert is not None else 0.0

    def snapshot(self) -> dict[str, np.ndarray]:
        return {
            "decider_raw": np.array(self._raw, dtype=np.float64),
            "decider_recent": np.array(self._recent, dtype=np.float64),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """The recent scores of `snapshot`, all or none (a damaged state raises first)."""
        if "decider_raw" in state:
            raw = [float(x) for x in state["decider_raw"]]
            recent = [float(x) for x in state["decider_recent"]]
            self._raw.clear()
            self._raw.extend(raw)
            self._recent.clear()
            self._recent.extend(recent)

    def step(
        self, raw: float, evidence: FloatArray, window_start: float, window_end: float
    ) -> Verdict:
        self._raw.append(raw)
        score = sum(self._raw) / len(self._raw)
        self._recent.append(score)
        contributions = {s: float(v) for s, v in zip(self.sensors, evidence, strict=True)}
        event: AlertEvent | None = None
        p = self.policy
        if self.open is None:
            if sum(1 for s in self._recent if s >= p.raise_at) >= p.k:
                self._peak = score
                event = self.open = AlertEvent(
                    kind=RAISED,
                    key=f"{self.asset}-{int(window_end * 1000)}",
                    asset=self.asset,
                    score=score,
                    top_sensors=self._top(contributions),
                    window_start=window_start,
                    window_end=window_end,
                    raised_at=window_end,
                    model_version=self.model_version,
                )
        else:
            self._peak = max(self._peak, score)
            if sum(1 for s in self._recent if s < p.clear_at) >= p.k:
                event = AlertEvent(
                    kind=CLEARED,
                    key=self.open.key,
                    asset=self.asset,
                    score=score,
                    top_sensors=self.open.top_sensors,
                    window_start=window_start,
                    window_end=window_end,
                    raised_at=self.open.raised_at,
                    model_version=self.model_version,
                )
                self.open = None
                self._recent.clear()
        return Verdict(
            asset=self.asset,
            score=score,
            raw=raw,
            alerting=self.open is not None,
            contributions=contributions,
            window_start=window_start,
            window_end=window_end,
            event=event,
        )

    def _top(self, contributions: dict[str, float]) -> tuple[tuple[str, float], ...]:
        ranked = sorted(contributions.items(), key=lambda kv: kv[1], reverse=True)
        return tuple(ranked[: self.policy.top_sensors])
