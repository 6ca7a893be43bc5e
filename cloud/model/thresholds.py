"""Decision thresholds from a false-alarm budget, fitted on normal data the network never saw.

Each held-out episode is calibrated on its start exactly as a site would be (the agent's
routine, `edge_agent.scoring.calibrate`), then every window of it is turned into the kinds of
evidence the decision combines. Per sensor, a level tolerance says how far its level wanders in
normal operation; per kind, the base threshold is the (1 - budget) quantile over the normal
windows; one common factor then scales all of them (the spread's threshold stays at least
`MIN_SPREAD`, the fault head's at least `MIN_PROB`) until the smoothed, combined score flags
at most the budget of normal windows (calibration stretches included) on most held-out
episodes. Each episode stands for a site, and a site's share of false alarms is what its
operators live with; the rare site that wanders far is left over budget rather than blinding
every other. Labels only say which windows are normal: the thresholds never see a fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud.model.dataset import Episode
from edge_agent.calibration import (
    DecisionParams,
    combine,
    evidence_values,
    level_deviation,
    level_evidence,
    smooth_causal,
    spread_deviation,
    subspace_deviation,
    thresholds_of,
)
from edge_agent.errors import InvalidInput
from edge_agent.scoring import ModelFrame, WindowModel, calibrate
from edge_agent.windowing import FloatArray

BISECT_STEPS = 40
MAX_FACTOR = 1e3
SITE_SHARE = 0.65  # of held-out sites kept under the false-alarm budget
# The fault head's probability is balanced over its training windows: below one half it says
# "normal" however rare the value is on held-out data, and such a threshold alarmed on new
# sites (the demo's pumps: 4 to 7 false alerts in 10 minutes).
MIN_PROB = 0.5
# An alert needs more windows in a row than the longest run of flagged normal windows on the
# same share of held-out episodes, within bounds: a plant waits at most MAX_ALERT_WINDOWS.
MAX_ALERT_WINDOWS = 30
# The spread evidence never alarms below this log ratio (in tolerances; 1.25: the recent spread
# 3.5 times above or below its calibration median). Normal stretches often quieten or liven
# about that much: at the pooled quantile alone (about 1.1-1.2 on SKAB) the spread's flags on
# normal windows raised the common factor, and so every other kind's threshold, by about 7 %.
# A stuck sensor (spread near 0) falls far below it (scripts/evaluate_unseen.py figures are in
# the commit that set it).
MIN_SPREAD = 1.25


@dataclass(frozen=True)
class EpisodeEvidence:
    """One held-out episode: evidence per kind for each window, and which windows are normal."""

    name: str
    values: dict[str, FloatArray]
    normal: np.ndarray
    deviation: FloatArray | None = None  # [W, N] level deviations before tolerances
    precision: FloatArray | None = None  # [N, N] the episode's level precision
    spread: FloatArray | None = None  # [W, N] spread deviations before tolerances
    subspace: FloatArray | None = None  # [W, N] subspace deviations before tolerances


@dataclass(frozen=True)
class FittedThresholds:
    """The decision with fitted thresholds, and what they give on the held-out normal data."""

    decision: DecisionParams
    normal_windows: int
    far: float  # share of all held-out normal windows flagged
    worst_episode_far: float
    far_by_kind: dict[str, float]  # share flagged by each kind alone (after smoothing)
    sites_under_budget: float  # share of held-out episodes whose false alarms fit the budget
    episodes: int

    def summary(self) -> dict[str, object]:
        return {
            "normal_windows": self.normal_windows,
            "held_out_far": round(self.far, 4),
            "worst_episode_far": round(self.worst_episode_far, 4),
            "episodes": self.episodes,
            "episodes_under_budget": round(self.sites_under_budget, 4),
            "far_by_kind": {k: round(v, 4) for k, v in self.far_by_kind.items()},
        }


def episode_evidence(
    model: WindowModel, frame: ModelFrame, episode: Episode, calibration_rows: int
) -> EpisodeEvidence | None:
    """Calibrate on the episode's start (half of it when it is short) and score all of it."""
    series = episode.series
    cal = min(calibration_rows, series.slots // 2)
    if cal <= frame.window or series.slots - cal < 1:  # 2+ full calibration windows
        return None
    calibration, _, ends, outputs = calibrate(model, frame, series, cal)
    labels = episode.labels[ends]
    normal = ~(labels > 0.5)  # NaN (unlabelled) counts as normal operation
    values = evidence_values(outputs, calibration, frame.decision)
    if calibration.level_precision is None:
        return EpisodeEvidence(episode.name, values, normal)
    deviation = level_deviation(outputs.level, calibration)
    spread = spread_deviation(outputs.spread, calibration)
    subspace = None
    if frame.decision.subspace:
        if calibration.subspace_basis is None:  # off at this site: no such evidence
            values["subspace"] = np.zeros(ends.size, dtype=np.float32)
        else:
            subspace = subspace_deviation(outputs.level, calibration)
    return EpisodeEvidence(
        episode.name, values, normal, deviation, calibration.level_precision, spread, subspace
    )


def _tolerance(parts: list[FloatArray], budget: float) -> FloatArray:
    """Median over episodes of each sensor's (1 - budget) quantile, at least 1."""
    quantiles = [np.quantile(np.abs(p), 1.0 - budget, axis=0) for p in parts]
    tolerance: FloatArray = np.maximum(1.0, np.median(np.stack(quantiles), axis=0))
    return tolerance


def with_tolerance(
    evidence: Sequence[EpisodeEvidence], budget: float
) -> tuple[list[EpisodeEvidence], dict[str, tuple[float, ...]]]:
    """Per-sensor level, spread (and subspace) tolerances, by their decision field names, and
    the evidence recomputed with them. A sensor's tolerance is the median over episodes of the
    (1 - budget) quantile of its deviation on their normal windows (at least 1): one recording
    that wanders does not blind every site."""
    levels = [e.deviation[e.normal] for e in evidence if e.deviation is not None]
    spreads = [e.spread[e.normal] for e in evidence if e.spread is not None]
    subspaces = [e.subspace[e.normal] for e in evidence if e.subspace is not None]
    if not levels or not spreads:
        return list(evidence), {}
    level_tol, spread_tol = _tolerance(levels, budget), _tolerance(spreads, budget)
    subspace_tol = _tolerance(subspaces, budget) if subspaces else None
    out = []
    for e in evidence:
        if e.deviation is None or e.precision is None or e.spread is None:
            out.append(e)
            continue
        level, joint = level_evidence(e.deviation / level_tol, e.precision)
        spread = (e.spread / spread_tol).max(axis=1)
        changed = {"level": level, "joint": joint, "spread": spread}
        if e.subspace is not None and subspace_tol is not None:
            changed["subspace"] = (e.subspace / subspace_tol).max(axis=1)
        out.append(dataclasses.replace(e, values=e.values | changed))
    tolerances = {"level_tolerance": _rounded(level_tol), "spread_tolerance": _rounded(spread_tol)}
    if subspace_tol is not None:
        tolerances["subspace_tolerance"] = _rounded(subspace_tol)
    return out, tolerances


def _rounded(values: FloatArray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def fit_thresholds(evidence: Sequence[EpisodeEvidence], base: DecisionParams) -> FittedThresholds:
    """Thresholds that keep most held-out sites under the budget: per kind the pooled
    (1 - budget) quantile of its normal values, times one common factor; per episode (a
    site) the smallest factor that keeps it under the budget; the factor used is the
    `SITE_SHARE` quantile of those, so one site that wanders does not blind all the others."""
    if not evidence:
        raise InvalidInput("thresholds: no held-out episode is long enough to calibrate and score")
    budget = base.target_far
    evidence = [e for e in evidence if e.normal.any()]
    if not evidence:
        raise InvalidInput("thresholds: the held-out episodes have no normal window")
    evidence, tolerances = with_tolerance(evidence, budget)
    base = dataclasses.replace(base, **tolerances)  # type: ignore[arg-type]
    kinds = list(thresholds_of(base))
    quantiles = {
        k: max(
            float(
                np.quantile(np.concatenate([e.values[k][e.normal] for e in evidence]), 1.0 - budget)
            ),
            1e-6,
        )
        for k in kinds
    }

    def threshold(kind: str, factor: float) -> float:
        if kind == "supervised":  # a head that does not believe in a fault never alarms
            return max(factor * quantiles[kind], MIN_PROB)
        if kind == "spread":
            return max(factor * quantiles[kind], MIN_SPREAD)
        return factor * quantiles[kind]

    def flagged(e: EpisodeEvidence, factor: float, only: str | None = None) -> np.ndarray:
        """Which of the episode's windows the smoothed score flags."""
        used = kinds if only is None else [only]
        raw = combine([e.values[k] / threshold(k, factor) for k in used], base.combine, base.alone)
        over: np.ndarray = smooth_causal(raw, base.smoothing) >= 1.0
        return over

    def share(e: EpisodeEvidence, factor: float, only: str | None = None) -> float:
        return float(flagged(e, factor, only)[e.normal].mean())

    def longest_normal_run(e: EpisodeEvidence, factor: float) -> int:
        longest = current = 0
        for hit in flagged(e, factor) & e.normal:
            current = current + 1 if hit else 0
            longest = max(longest, current)
        return longest

    def smallest_factor(e: EpisodeEvidence) -> float:
        lo, hi = 1e-3, MAX_FACTOR
        for _ in range(BISECT_STEPS):
            mid = (lo * hi) ** 0.5
            lo, hi = (lo, mid) if share(e, mid) <= budget else (mid, hi)
        return hi

    factors = [smallest_factor(e) for e in evidence]
    hi = float(np.quantile(factors, SITE_SHARE))
    weights = np.asarray([e.normal.sum() for e in evidence], dtype=np.float64)
    shares = np.asarray([share(e, hi) for e in evidence])
    far = float((shares * weights).sum() / weights.sum())
    runs = [longest_normal_run(e, hi) for e in evidence]
    alert_windows = int(
        np.clip(np.quantile(runs, SITE_SHARE) + 1, base.alert_windows, MAX_ALERT_WINDOWS)
    )
    total = int(weights.sum())
    worst = float(shares.max())
    sites_under = float((shares <= budget + 1e-9).mean())
    fitted = {k: threshold(k, hi) for k in quantiles}
    changes: dict[str, object] = {}
    names = {
        "level": "level_threshold",
        "joint": "joint_threshold",
        "spread": "spread_threshold",
        "forecast": "residual_threshold",
        "subspace": "subspace_threshold",
    }
    for kind, field in names.items():
        if kind in fitted:
            changes[field] = fitted[kind]
    if "supervised" in fitted:
        if fitted["supervised"] < 1.0:
            changes["prob_threshold"] = fitted["supervised"]
        else:  # the head cannot stay under the budget on normal data: it takes no part
            changes["supervised"] = False
    changes["alert_windows"] = alert_windows
    decision = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    by_kind = {
        kind: float(sum(share(e, hi, kind) * w for e, w in zip(evidence, weights, strict=True)))
        / float(weights.sum())
        for kind in kinds
    }
    return FittedThresholds(decision, total, far, worst, by_kind, sites_under, len(evidence))
