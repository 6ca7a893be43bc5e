"""Site calibration and the fault decision: the routine an agent runs after installing a model.

A bundle is trained on many sites; a new site differs in levels and noise. Calibration takes
an initial stretch of the site's data, with no labels, and fits:

- the input normalisation (per-sensor median and spread, the spread floored at a share of the
  typical within-site spread of the training data, so a flat sensor does not turn noise into
  alarms), applied as an affine map
  into the network's own normalisation, so the network and its baked constants stay untouched;
- the scale of each sensor's forecast residual on that stretch;
- the normal range of each sensor's recent level (the mean of the last `level_window` rows, in
  site units) and the correlation between those levels, so a window can be judged by how far
  its levels moved from normal operation here, one sensor at a time and jointly; and the
  typical recent spread of each sensor.

Each window then yields up to five evidence scores, each divided by its threshold so that 1
means "fault" (thresholds are fitted at training for a false-alarm budget on held-out normal
data, `cloud/model/thresholds.py`):

- `level`: the largest per-sensor level deviation (a drift, a step, a leak);
- `spread`: the largest per-sensor change of the recent spread (standard deviation of the last
  `level_window` rows) against its calibration median, as a log ratio: a stuck sensor, a
  noisier one, an oscillation;
- `joint`: the Mahalanobis distance of the level deviations under the site's correlation
  (sensors that normally move together and no longer do);
- `subspace` (`DecisionParams.subspace`): the largest per-sensor residual of the levels off
  the few directions the site's levels move along together (a PCA of the calibration levels,
  the SPE of classical MSPC): many sensors driven by a few operating-state factors, one of
  them leaving the pattern;
- `forecast`: the largest forecast residual of the network in site units (dynamics), among
  the sensors whose recent level is not closer to the site's normal than the rows before it
  (`forecast_away`): a sensor coming back to normal, as at the end of a fault, surprises the
  forecast as much as one leaving it, but is no fault;
- `supervised`: the fault head, only where the training data had labels (and never below
  probability 0.5); it can add detections of a labelled kind, never carry the others.

The window's raw score (`combine`, default `top2`) is the mean of the two strongest of them or
the strongest divided by `alone`, whichever is more: one kind needs a margin over its
threshold unless another kind backs it (`max`: the largest). It is smoothed causally over the
last few windows. Per-sensor tolerances (how far each sensor's level and spread wander in normal
operation) divide the level and spread deviations first, and scale the forecast residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.decision_params import COMBINE_RULES as COMBINE_RULES
from edge_agent.decision_params import DecisionParams as DecisionParams
from edge_agent.errors import InvalidInput
from edge_agent.windowing import FloatArray

SCALE_EPS = 1e-6
LEVEL_SCALE_FLOOR = 0.25  # site units: a sensor flat during calibration still has a scale
JOINT_SHRINKAGE = 0.5  # share of the identity in the level correlation (few effective rows)
SPREAD_EPS = 0.05  # site units: a log ratio of spreads near zero stays finite
# A principal direction of the calibration levels is kept when its variance exceeds this
# multiple of the median one (the noise floor): EXP14f, after the 90 %-of-variance rule of
# EXP14e dropped random-walk factors that barely moved during calibration.
SUBSPACE_NOISE_MULTIPLE = 10.0
# Site-normalised network inputs are clipped here: far beyond any fault (a few tens of
# spreads), far below what overflows the network's float32 arithmetic.
Z_LIMIT = 1e4


@dataclass(frozen=True)
class SiteCalibration:
    """What calibration fitted for one site; arrays are [N] (`level_precision` [N, N])."""

    input_center: FloatArray
    input_scale: FloatArray
    residual_scale: FloatArray
    rows: int
    level_center: FloatArray | None = None
    level_scale: FloatArray | None = None
    level_precision: FloatArray | None = None
    spread_center: FloatArray | None = None
    subspace_center: FloatArray | None = None  # [N] (`fit_subspace`; None: the kind is off)
    subspace_basis: FloatArray | None = None  # [N, k]
    subspace_scale: FloatArray | None = None  # [N]


@dataclass(frozen=True)
class WindowOutputs:
    """The network's outputs for a batch of windows, and their recent levels in site units."""

    prob: FloatArray  # [B]
    residual: FloatArray  # [B, N]
    contribution: FloatArray  # [B, N]
    level: FloatArray  # [B, N] (zeros when the decision uses no levels)
    spread: FloatArray  # [B, N] recent standard deviation in site units (same)
    before: FloatArray | None = None  # [B, N] mean of the rows before the recent ones (same)

    def select(self, rows: np.ndarray) -> WindowOutputs:
        return WindowOutputs(
            self.prob[rows],
            self.residual[rows],
            self.contribution[rows],
            self.level[rows],
            self.spread[rows],
            None if self.before is None else self.before[rows],
        )

    @staticmethod
    def concat(parts: list[WindowOutputs]) -> WindowOutputs:
        befores = [p.before for p in parts]
        return WindowOutputs(
            np.concatenate([p.prob for p in parts]),
            np.concatenate([p.residual for p in parts]),
            np.concatenate([p.contribution for p in parts]),
            np.concatenate([p.level for p in parts]),
            np.concatenate([p.spread for p in parts]),
            None if any(b is None for b in befores) else np.concatenate(befores),  # type: ignore[arg-type]
        )


def fit_input_normalisation(
    values: FloatArray, mask: FloatArray, training_scale: FloatArray, floor: float
) -> tuple[FloatArray, FloatArray]:
    """Per-sensor median and standard deviation of the valid readings, floored."""
    n = values.shape[1]
    center = np.zeros(n, dtype=np.float32)
    scale = np.ones(n, dtype=np.float32)
    for j in range(n):
        valid = values[mask[:, j] > 0, j].astype(np.float64)  # float32 squares overflow
        if valid.size < 2:
            raise InvalidInput(
                f"calibration: sensor {j} has {valid.size} valid readings in the calibration "
                "stretch; it needs at least 2"
            )
        if not np.isfinite(valid).all():
            raise InvalidInput(
                f"calibration: sensor {j} has readings beyond float32's range in the "
                "calibration stretch"
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
    """Map raw site readings so the network's baked normalisation yields site-normalised values
    (clipped to +-Z_LIMIT site spreads: a reading no site produces cannot overflow the network)."""
    with np.errstate(over="ignore"):  # beyond float32: infinite, then clipped
        z: FloatArray = np.clip((window - site_center) / site_scale, -Z_LIMIT, Z_LIMIT)
    return (z * net_scale + net_center).astype(np.float32)  # NaN (missing) stays NaN


def recent_stats(
    window: FloatArray, mask: FloatArray, net_center: FloatArray, net_scale: FloatArray, rows: int
) -> tuple[FloatArray, FloatArray]:
    """[B, N] twice: the mean and the standard deviation of the last `rows` valid readings of
    each window, in site units (the windows are in network space, as the network receives
    them). No valid reading: NaN; `rows` 0: zeros."""
    shape = (window.shape[0], window.shape[2])
    if rows <= 0:
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    tail = (window[:, -rows:] - net_center) / net_scale
    valid = mask[:, -rows:]
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = (tail * valid).sum(axis=1) / count
        square = (tail * tail * valid).sum(axis=1) / count
    spread = np.sqrt(np.clip(square - level * level, 0.0, None))
    level = np.where(count > 0, level, np.nan)
    spread = np.where(count > 1, spread, np.nan)
    return level.astype(np.float32), spread.astype(np.float32)


def earlier_level(
    window: FloatArray, mask: FloatArray, net_center: FloatArray, net_scale: FloatArray, rows: int
) -> FloatArray:
    """[B, N]: the mean of the `2 * rows` valid readings before the last `rows` of each
    window (as many as the window holds), in site units; none: NaN (`rows` 0: NaN)."""
    if rows <= 0 or window.shape[1] <= rows:
        return np.full((window.shape[0], window.shape[2]), np.nan, dtype=np.float32)
    level, _ = recent_stats(window[:, :-rows], mask[:, :-rows], net_center, net_scale, 2 * rows)
    return level


def fit_spread_normal(spread: FloatArray) -> FloatArray:
    """The median recent spread of each sensor during calibration."""
    center = np.nanmedian(spread, axis=0)
    return np.where(np.isnan(center), 0.0, center).astype(np.float32)


def spread_deviation(
    spread: FloatArray, cal: SiteCalibration, tolerance: tuple[float, ...] = ()
) -> FloatArray:
    """[B, N]: |log| of each recent spread over its calibration median, divided by the
    sensor's tolerance; no readings: 0."""
    assert cal.spread_center is not None
    ratio = np.log((spread + SPREAD_EPS) / (cal.spread_center + SPREAD_EPS))
    if tolerance:
        ratio = ratio / np.asarray(tolerance, dtype=np.float32)
    dev: FloatArray = np.nan_to_num(np.abs(ratio)).astype(np.float32)
    return dev


def fit_level_normal(level: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Centre, spread and shrunk precision of the levels seen during calibration."""
    if level.shape[0] < 2:
        raise InvalidInput("calibration: fewer than 2 windows to fit the normal levels")
    n = level.shape[1]
    center = np.nanmedian(level, axis=0)
    center = np.where(np.isnan(center), 0.0, center).astype(np.float32)
    spread = np.nanstd(level, axis=0)
    scale = np.maximum(np.where(np.isnan(spread), 0.0, spread), LEVEL_SCALE_FLOOR)
    dev = np.nan_to_num((level - center) / scale)
    corr = (dev.T @ dev) / max(1, dev.shape[0] - 1)
    d = np.sqrt(np.clip(np.diag(corr), SCALE_EPS, None))
    corr = corr / np.outer(d, d)
    shrunk = JOINT_SHRINKAGE * np.eye(n) + (1 - JOINT_SHRINKAGE) * corr
    precision = np.linalg.inv(shrunk)
    return center, scale.astype(np.float32), precision.astype(np.float32)


def fit_subspace(level: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """Centre [N], basis [N, k] and per-sensor residual scale [N] of the calibration levels
    [W, N]. The eigenvalues of the centred levels' covariance (squared singular values over
    W - 1) have their median as the noise floor (over the first min(W - 1, N), those the
    windows can make non-zero); k is the
    number above `SUBSPACE_NOISE_MULTIPLE` times it, at least 1 and at most N - 2. None (the
    kind is off) for N <= 3 or levels that do not vary. The scale is the residuals' robust
    spread (1.4826 MAD), floored like the level scale."""
    windows, n = level.shape
    if n <= 3 or windows < 2:
        return None
    center = np.nanmedian(level, axis=0)
    center = np.where(np.isnan(center), 0.0, center)
    dev = np.nan_to_num(level - center).astype(np.float64)
    _, singular, vt = np.linalg.svd(dev, full_matrices=False)
    eigen = np.zeros(n)
    eigen[: singular.size] = singular**2 / (windows - 1)
    if not eigen.sum() > 0:
        return None
    # The floor from the eigenvalues the windows can have: with fewer windows than sensors
    # the zeros past the rank would put the median at 0 and keep every direction (a residual
    # of nothing, hypersensitive).
    rank = min(windows - 1, n)
    floor = np.median(eigen[:rank])
    above = int(np.count_nonzero(eigen > SUBSPACE_NOISE_MULTIPLE * floor))
    k = min(max(above, 1), n - 2)
    basis = vt[:k].T
    residual = dev - dev @ basis @ basis.T
    mad = np.median(np.abs(residual - np.median(residual, axis=0)), axis=0)
    scale = np.maximum(1.4826 * mad, LEVEL_SCALE_FLOOR)
    return center.astype(np.float32), basis.astype(np.float32), scale.astype(np.float32)


def subspace_deviation(
    level: FloatArray, cal: SiteCalibration, tolerance: tuple[float, ...] = ()
) -> FloatArray:
    """[B, N]: each level's residual off the site's subspace, in residual scales divided by the
    sensor's tolerance; a level without readings counts as at the centre."""
    assert cal.subspace_center is not None and cal.subspace_basis is not None
    assert cal.subspace_scale is not None
    dev = np.nan_to_num(level - cal.subspace_center).astype(np.float32)
    basis = cal.subspace_basis
    residual = dev - (dev @ basis) @ basis.T
    scale = cal.subspace_scale * (np.asarray(tolerance, dtype=np.float32) if tolerance else 1.0)
    out: FloatArray = np.abs(residual / scale).astype(np.float32)
    return out


def fit_residual_scale(residual: FloatArray, quantile: float) -> FloatArray:
    """Per-sensor residual level that normal operation at this site stays under."""
    if residual.shape[0] == 0:
        raise InvalidInput("calibration: no windows in the calibration stretch")
    level = np.quantile(residual, quantile, axis=0)
    floor = max(float(np.median(level)) * 0.1, SCALE_EPS)
    return np.maximum(level, floor).astype(np.float32)


def evidence_values(
    out: WindowOutputs, cal: SiteCalibration, params: DecisionParams
) -> dict[str, FloatArray]:
    """Each kind of evidence per window, before its threshold: [B] each (per sensor: see
    `sensor_evidence`)."""
    values = {
        "forecast": forecast_deviation(out, cal, params).max(axis=1),
        "supervised": out.prob,
    }
    if cal.level_center is not None and cal.level_precision is not None:
        dev = level_deviation(out.level, cal, params.level_tolerance)
        values["level"], values["joint"] = level_evidence(dev, cal.level_precision)
    if cal.spread_center is not None:
        values["spread"] = spread_deviation(out.spread, cal, params.spread_tolerance).max(axis=1)
    if params.subspace and cal.subspace_basis is not None:
        dev = subspace_deviation(out.level, cal, params.subspace_tolerance)
        values["subspace"] = dev.max(axis=1)
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def forecast_deviation(
    out: WindowOutputs, cal: SiteCalibration, params: DecisionParams
) -> FloatArray:
    """[B, N]: forecast residuals in the site's residual scale (times the sensor's
    `residual_tolerance`); with `forecast_away`, 0 for a sensor whose recent level is closer
    to the site's normal than its level before."""
    scale = cal.residual_scale
    if params.residual_tolerance:
        scale = scale * np.asarray(params.residual_tolerance, dtype=np.float32)
    dev: FloatArray = out.residual / scale
    if params.forecast_away and out.before is not None and cal.level_center is not None:
        back = np.abs(out.level - cal.level_center) < np.abs(out.before - cal.level_center)
        dev = np.where(back, 0.0, dev).astype(np.float32)  # NaN compares False: kept
    return dev


def level_evidence(dev: FloatArray, precision: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The largest per-sensor deviation and the Mahalanobis distance (per sensor) of all."""
    joint = np.einsum("bi,ij,bj->b", dev, precision, dev) / max(1, dev.shape[1])
    return np.abs(dev).max(axis=1), np.sqrt(np.clip(joint, 0.0, None))


def thresholds_of(params: DecisionParams) -> dict[str, float]:
    """The threshold of each kind of evidence the decision uses."""
    used = {"forecast": params.residual_threshold}
    if params.supervised:
        used["supervised"] = params.prob_threshold
    if params.level_window > 0:
        used["level"] = params.level_threshold
        used["joint"] = params.joint_threshold
        used["spread"] = params.spread_threshold
        if params.subspace:
            used["subspace"] = params.subspace_threshold
    return used


def fault_score(out: WindowOutputs, cal: SiteCalibration, params: DecisionParams) -> FloatArray:
    """One score per window; >= 1 means fault (see `combine`)."""
    return score_of(evidence_values(out, cal, params), params)


def score_of(values: dict[str, FloatArray], params: DecisionParams) -> FloatArray:
    """`fault_score` from evidence already computed (`evidence_values`)."""
    return combine(
        [values[k] / t for k, t in thresholds_of(params).items() if k in values],
        params.combine,
        params.alone,
    )


def combine(normalised: list[FloatArray], rule: str, alone: float = 0.0) -> FloatArray:
    """Evidence divided by its thresholds -> one score. `max`: any kind alone raises it;
    `top2`: the mean of the two strongest, so a blip in one kind alone does not, or the
    strongest divided by `alone` where that is more (`alone` 0: never one kind alone)."""
    if not normalised:
        raise InvalidInput("decision: no kind of evidence to combine")
    stacked = np.stack(normalised)
    score: FloatArray
    if rule == "top2" and stacked.shape[0] >= 2:
        ranked = np.sort(stacked, axis=0)
        score = ranked[-2:].mean(axis=0)
        if alone > 0:
            score = np.maximum(score, ranked[-1] / alone)
        score = score.astype(np.float32)
    else:
        score = stacked.max(axis=0).astype(np.float32)
    return score


def sensor_evidence(
    one: WindowOutputs,
    cal: SiteCalibration,
    params: DecisionParams,
    values: dict[str, FloatArray] | None = None,
) -> FloatArray:
    """Per-sensor share of the evidence of the one window in `one`, summing to 1, from the
    kind of evidence that drives its score: level or spread deviations, forecast residuals
    (in site units of normal), else the model's attention-based contribution. `values`: its
    `evidence_values`, when already computed."""
    if values is None:
        values = evidence_values(one, cal, params)
    thresholds = thresholds_of(params)
    ranked = sorted((float(values[k][0]) / t, k) for k, t in thresholds.items() if k in values)
    driver = ranked[-1][1] if ranked else "supervised"
    per_sensor: FloatArray
    if driver in ("level", "joint"):
        per_sensor = np.abs(level_deviation(one.level, cal, params.level_tolerance)[0])
    elif driver == "spread":
        per_sensor = spread_deviation(one.spread, cal, params.spread_tolerance)[0]
    elif driver == "subspace":
        per_sensor = subspace_deviation(one.level, cal, params.subspace_tolerance)[0]
    elif driver == "forecast":
        per_sensor = forecast_deviation(one, cal, params)[0]
    else:
        per_sensor = one.contribution[0]
    total = float(per_sensor.sum())
    if total > 0 and np.isfinite(total):
        return (per_sensor / total).astype(np.float32)
    return np.full(per_sensor.shape, 1.0 / max(1, per_sensor.size), dtype=np.float32)


def level_deviation(
    level: FloatArray, cal: SiteCalibration, tolerance: tuple[float, ...] = ()
) -> FloatArray:
    """[B, N]: how far each level is from the site's normal, in calibration spreads divided by
    the sensor's tolerance; a level without readings counts as normal."""
    assert cal.level_center is not None and cal.level_scale is not None
    scale = cal.level_scale * (np.asarray(tolerance, dtype=np.float32) if tolerance else 1.0)
    dev: FloatArray = np.nan_to_num((level - cal.level_center) / scale).astype(np.float32)
    return dev


def smooth_causal(scores: FloatArray, width: int) -> FloatArray:
    """Mean of each score and up to `width - 1` scores before it."""
    if width <= 1 or scores.size == 0:
        return scores.astype(np.float32)
    sums = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
    idx = np.arange(scores.size)
    lo = np.maximum(0, idx + 1 - width)
    smoothed: FloatArray = ((sums[idx + 1] - sums[lo]) / (idx + 1 - lo)).astype(np.float32)
    return smoothed
