"""How model outputs become a fault score: the parameters a bundle's manifest stores.

Apart from `calibration.py` (which applies them, with numpy) so that what only needs their
defaults -- the operator CLI's help -- starts without numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.errors import InvalidInput

COMBINE_RULES = ("max", "top2")


@dataclass(frozen=True)
class DecisionParams:
    """How outputs become a fault score (stored in the bundle manifest)."""

    prob_threshold: float = 0.8
    residual_threshold: float = 8.0
    residual_quantile: float = 0.99
    # Raw window scores averaged into the score a row is flagged on (causal mean). 1 (none)
    # since EXP14j (scripts/experiments/issue14/README.md: rule written first, training seeds
    # 17 / 18): injected faults' F1 +0.017 / +0.016 on valve1's background, FAR -1.6 / -1.7 points,
    # unseen valve1 even; the fitted `alert_windows` debounce still steadies alerts. Bundles
    # made before it keep the 5 in their manifest.
    smoothing: int = 1
    scale_floor: float = 0.1
    level_window: int = 30  # rows in a recent level; 0: no level evidence (older bundles)
    level_threshold: float = 8.0
    joint_threshold: float = 6.0
    # Per sensor: how far its level drifts in normal operation, in its calibration spreads
    # (fitted on held-out normal data; temperatures drift, flows hold). Empty: 1 for all.
    level_tolerance: tuple[float, ...] = ()
    spread_threshold: float = 4.0
    spread_tolerance: tuple[float, ...] = ()  # per sensor, like level_tolerance
    # Per sensor: multiplies its forecast residual scale (how surprising its normal
    # operation is besides what calibration saw: a recurring benign dip). Empty: 1 for all.
    # Only fine-tuning on operators' verdicts sets it (`cloud/model/decision_fit.py`).
    residual_tolerance: tuple[float, ...] = ()
    # Forecast residuals count only for sensors not returning to normal (`forecast_deviation`).
    # Bundles made before it: False. Chosen with scripts/evaluate_unseen.py, injection seeds
    # 300-302 and training seeds 0 and 2 (figures in the commit that set it).
    forecast_away: bool = True
    # Subspace evidence (`edge_agent.calibration.fit_subspace`): the levels' residual off the
    # site's principal directions, per sensor. Bundles made before it: False. On by default
    # since EXP14f (scripts/experiments/issue14/README.md), once captures carried the subspace
    # and fine-tuning fitted its tolerance.
    subspace: bool = True
    subspace_threshold: float = 8.0
    subspace_tolerance: tuple[float, ...] = ()  # per sensor, like level_tolerance
    supervised: bool = True  # whether the fault head takes part (it was trained on labels)
    combine: str = "top2"  # how kinds of evidence make one score (`combine`)
    # `top2`: one kind alone raises the score only at this multiple of its threshold (two
    # kinds together at 1); 0: never alone. Bundles made before it: 0. 1.15 (with 8 segments)
    # from scripts/evaluate_unseen.py, figures in the commit that set it.
    alone: float = 1.15
    # An alert needs this many windows at or above 1 (of a few more): longer than the runs
    # normal operation produced on held-out data (fitted; the agent's k may be stricter).
    alert_windows: int = 3
    target_far: float = 0.05  # the false-alarm budget the thresholds were fitted for

    def __post_init__(self) -> None:
        if not 0 < self.prob_threshold <= 1:
            raise InvalidInput(f"decision: prob_threshold {self.prob_threshold} not in (0, 1]")
        for name in (
            "residual_threshold",
            "level_threshold",
            "joint_threshold",
            "spread_threshold",
            "subspace_threshold",
        ):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"decision: {name} {getattr(self, name)} <= 0")
        if not 0 < self.residual_quantile <= 1:
            raise InvalidInput(f"decision: residual_quantile {self.residual_quantile} invalid")
        if self.alert_windows < 1:
            raise InvalidInput(f"decision: alert_windows {self.alert_windows} < 1")
        if self.smoothing < 1:
            raise InvalidInput(f"decision: smoothing {self.smoothing} < 1")
        if self.level_window < 0:
            raise InvalidInput(f"decision: level_window {self.level_window} < 0")
        for name in (
            "level_tolerance",
            "spread_tolerance",
            "residual_tolerance",
            "subspace_tolerance",
        ):
            if any(not t > 0 for t in getattr(self, name)):
                raise InvalidInput(f"decision: {name} {getattr(self, name)} has values <= 0")
        if self.combine not in COMBINE_RULES:
            raise InvalidInput(f"decision: combine {self.combine!r} is not one of {COMBINE_RULES}")
        if self.alone != 0 and not self.alone >= 1:
            raise InvalidInput(f"decision: alone {self.alone} is neither 0 nor >= 1")
        if not 0 < self.target_far < 1:
            raise InvalidInput(f"decision: target_far {self.target_far} not in (0, 1)")
