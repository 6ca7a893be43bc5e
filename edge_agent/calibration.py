"""Site calibration and the fault decision: the routine an agent runs after installing a model.

A bundle is trained on many sites; a new site differs in levels and noise. Calibration takes
an initial stretch of the site's data, with no labels, and fits:

- the input normalisation (per-sensor median and spread, the spread floored at a share of the
  training spread so a flat sensor does not turn noise into alarms), applied as an affine map
  into the network's own normalisation, so the network and its baked constants stay untouched;
- the scale of each sensor's forecast residual on that stretch, so that a residual score of 1
  means "as far off as the worst of normal operation here".

The decision combines the supervised fault probability and the residual score into one score
where >= 1 means fault, and smooths it causally over the last few windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.errors import InvalidInput
from edge_agent.windowing import FloatArray

SCALE_EPS = 1e-6


@dataclass(frozen=True)
class DecisionParams:
    """How outputs become a fault score (stored in the bundle manifest)."""

    prob_threshold: float = 0.8
    residual_threshold: float = 8.0
    residual_quantile: float = 0.99
    smoothing: int = 10
    scale_floor: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.prob_threshold <= 1:
            raise InvalidInput(f"decision: prob_threshold {self.prob_threshold} not in (0, 1]")
        if self.residual_threshold <= 0:
            raise InvalidInput(f"decision: residual_threshold {self.residual_threshold} <= 0")
        if not 0 < self.residual_quantile <= 1:
            raise InvalidInput(f"decision: residual_quantile {self.residual_quantile} invalid")
        if self.smoothing < 1:
            raise InvalidInput(f"decision: smoothing {self.smoothing} < 1")


@dataclass(frozen=True)
class SiteCalibration:
    """What calibration fitted for one site; all arrays are [N]."""

    input_center: FloatArray
    input_scale: FloatArray
    residual_scale: FloatArray
    rows: int


def fit_input_normalisation(
    values: FloatArray, mask: FloatArray, training_scale: FloatArray, floor: float
) -> tuple[FloatArray, FloatArray]:
    """Per-sensor median and standard deviation of the valid readings, floored."""
    n = values.shape[1]
    center = np.zeros(n, dtype=np.float32)
    scale = np.ones(n, dtype=np.float32)
    for j in range(n):
        valid = values[mask[:, j] > 0, j]
        if valid.size < 2:
            raise InvalidInput(
                f"calibration: sensor {j} has {valid.size} valid readings in the calibration "
                "stretch; it needs at least 2"
            )
        center[j] = float(np.median(valid))
        scale[j] = max(float(valid.std()), floor * float(training_scale[j]), SCALE_EPS)
    return center, scale


def to_network_space(
    window: FloatArray,
    site_center: FloatArray,
    site_scale: FloatArray,
    net_center: FloatArray,
    net_scale: FloatArray,
) -> FloatArray:
    """Map raw site readings so the network's baked normalisation yields site-normalised values."""
    z = (window - site_center) / site_scale
    return (z * net_scale + net_center).astype(np.float32)


def fit_residual_scale(residual: FloatArray, quantile: float) -> FloatArray:
    """Per-sensor residual level that normal operation at this site stays under."""
    if residual.shape[0] == 0:
        raise InvalidInput("calibration: no windows in the calibration stretch")
    level = np.quantile(residual, quantile, axis=0)
    floor = max(float(np.median(level)) * 0.1, SCALE_EPS)
    return np.maximum(level, floor).astype(np.float32)


def fault_score(
    fault_prob: FloatArray,
    residual: FloatArray,
    residual_scale: FloatArray,
    params: DecisionParams,
) -> FloatArray:
    """One score per window; >= 1 means fault. Either signal alone can raise it."""
    supervised = fault_prob / params.prob_threshold
    unsupervised = (residual / residual_scale).max(axis=1) / params.residual_threshold
    score: FloatArray = np.maximum(supervised, unsupervised).astype(np.float32)
    return score


def smooth_causal(scores: FloatArray, width: int) -> FloatArray:
    """Mean of each score and up to `width - 1` scores before it."""
    if width <= 1 or scores.size == 0:
        return scores.astype(np.float32)
    sums = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
    idx = np.arange(scores.size)
    lo = np.maximum(0, idx + 1 - width)
    smoothed: FloatArray = ((sums[idx + 1] - sums[lo]) / (idx + 1 - lo)).astype(np.float32)
    return smoothed
