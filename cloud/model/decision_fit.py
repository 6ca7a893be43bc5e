"""Fitting the decision to operators' verdicts: per-sensor tolerances after a fine-tune.

Training the network cannot silence most false alarms. The decision's level, spread and joint
evidence compare a window's recent levels and spreads with the site calibration, whatever the
network learned; and its forecast evidence is the residual over the scale calibration saw, so
a benign but sudden dip of one sensor (a backflush) still surprises a better forecast as much
as before. What the decision can learn is how far each sensor wanders in normal operation:
its `level_tolerance`, `spread_tolerance`, `residual_tolerance` and (where the decision
uses the subspace kind and the window's calibration carries a subspace) `subspace_tolerance`
(`edge_agent.calibration`), which divide its deviations.

The fit recomputes the evidence of every judged window exactly as the agent does
(`edge_agent.scoring.window_outputs`, `edge_agent.calibration.evidence_values`/`score_of`),
with the fine-tuned network and the site calibration the window was captured under, its
residual scales rescaled to the new network (`with_network_residuals`: an agent recalibrates
when it installs the model; the cloud only estimates that from the sampled normal windows, so
false alarms are judged under the least favourable estimate, and faults too). Then it raises
tolerances, starting from the base's (none: 1.0 each), one multiplicative step (`STEP`) at a
time:

1. Take the false-alarm window (verdict false) scoring highest among those at or above
   `FALSE_ALARM_MARGIN`; done when there is none.
2. Its per-sensor level, spread, forecast and subspace deviations (each over its kind's
   threshold) name the candidates, largest first; the first whose step lowers that window's
   score and keeps every protected fault window at or above its floor is taken. A fault
   window (verdict true) is protected when it scored at least 1 before the fit (one already
   under 1 was missed before; it is reported, it does not block); its floor is
   `FAULT_MARGIN`, or its score before the fit where that was lower. A step that would
   break a floor freezes that (kind, sensor) for the rest of the fit.
3. A false-alarm window no candidate step can lower is left: it stays a false alarm and is
   counted. So is one that the fault head alone keeps at or above the margin.

Faults win over false alarms: the fit never trades a detected fault for a quieter site.
Every step is deterministic (ties go to level before spread before forecast before
subspace, then the lower sensor index), each tolerance ends at most one step above what its
false alarms need, and none passes `MAX_TOLERANCE`. Sampled normal windows are scored before
and after, for the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.calibration import (
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    forecast_deviation,
    level_deviation,
    score_of,
    spread_deviation,
    subspace_deviation,
    to_network_space,
)
from edge_agent.scoring import BATCH, ModelFrame, WindowModel, window_outputs
from edge_agent.windowing import FloatArray

FALSE_ALARM, FAULT, NORMAL = "false_alarm", "fault", "normal"
GROUPS = (FALSE_ALARM, FAULT, NORMAL)
FALSE_ALARM_MARGIN = 0.8  # a false alarm must score under this after the fit
FAULT_MARGIN = 1.25  # a detected fault keeps scoring at least this (or what it scored)
STEP = 1.1
MAX_TOLERANCE = 100.0
MAX_STEPS = 5000
# Each divides that kind's per-sensor deviations (level: the joint evidence's too).
TOLERANCE_KINDS = ("level", "spread", "residual", "subspace")
THRESHOLD_OF = {"level": "level_threshold", "spread": "spread_threshold",
                "residual": "residual_threshold", "subspace": "subspace_threshold"}  # fmt: skip
MIN_NORMAL_WINDOWS = 10  # sampled normal windows of one calibration to rescale its residuals


@dataclass(frozen=True)
class JudgedBatch:
    """Windows scored under one site calibration: the network's outputs and each one's group
    (FALSE_ALARM, FAULT or NORMAL)."""

    calibration: SiteCalibration
    outputs: WindowOutputs
    group: tuple[str, ...]


@dataclass(frozen=True)
class GroupScores:
    """The window scores of one group, summarised."""

    windows: int
    mean: float
    min: float
    max: float
    alerting: int  # windows at or above 1

    @staticmethod
    def of(scores: FloatArray) -> GroupScores:
        if scores.size == 0:
            return GroupScores(0, 0.0, 0.0, 0.0, 0)
        return GroupScores(
            int(scores.size),
            float(scores.mean()),
            float(scores.min()),
            float(scores.max()),
            int((scores >= 1.0).sum()),
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "windows": self.windows,
            "mean": round(self.mean, 3),
            "min": round(self.min, 3),
            "max": round(self.max, 3),
            "at_or_above_1": self.alerting,
        }


@dataclass(frozen=True)
class ToleranceFit:
    """What the fit chose and what it did to each group's scores."""

    decision: DecisionParams  # the base's, with the fitted tolerances
    before: dict[str, GroupScores]  # the fine-tuned network under the base's decision
    after: dict[str, GroupScores]  # ... under the fitted decision
    false_alarms_left: int  # false-alarm windows still at or above 1 (still alerting)
    faults_missed_before: int  # fault windows under 1 before the fit (not protected)
    steps: int
    note: str

    def as_dict(self) -> dict[str, object]:
        return {
            "level_tolerance": list(self.decision.level_tolerance),
            "spread_tolerance": list(self.decision.spread_tolerance),
            "residual_tolerance": list(self.decision.residual_tolerance),
            "subspace_tolerance": list(self.decision.subspace_tolerance),
            "false_alarm_margin": FALSE_ALARM_MARGIN,
            "fault_margin": FAULT_MARGIN,
            "before": {k: v.as_dict() for k, v in self.before.items()},
            "after": {k: v.as_dict() for k, v in self.after.items()},
            "false_alarms_left": self.false_alarms_left,
            "faults_missed_before": self.faults_missed_before,
            "steps": self.steps,
            "note": self.note,
        }


def judged_batches(
    model: WindowModel,
    frame: ModelFrame,
    values: FloatArray,
    mask: FloatArray,
    calibration: Sequence[SiteCalibration | None],
    group: Sequence[str],
) -> list[JudgedBatch]:
    """Runs `model` on the windows [W, T, N] (site units, NaN where missing) that have a
    calibration and a group, one batch per distinct calibration, as the agent feeds them."""
    by_calibration: dict[bytes, list[int]] = {}
    cals: dict[bytes, SiteCalibration] = {}
    for i, (cal, name) in enumerate(zip(calibration, group, strict=True)):
        if cal is None or name not in GROUPS:
            continue
        key = _identity(cal)
        by_calibration.setdefault(key, []).append(i)
        cals[key] = cal
    batches = []
    for key, rows in by_calibration.items():
        cal = cals[key]
        parts = []
        for start in range(0, len(rows), BATCH):
            take = rows[start : start + BATCH]
            x = to_network_space(
                np.nan_to_num(values[take]),
                cal.input_center,
                cal.input_scale,
                frame.net_center,
                frame.net_scale,
            )
            parts.append(window_outputs(model, frame, x, mask[take]))
        batches.append(JudgedBatch(cal, WindowOutputs.concat(parts), tuple(group[i] for i in rows)))
    return batches


def _identity(cal: SiteCalibration) -> bytes:
    arrays = (
        cal.input_center,
        cal.input_scale,
        cal.residual_scale,
        cal.level_center,
        cal.level_scale,
        cal.level_precision,
        cal.spread_center,
        cal.subspace_center,
        cal.subspace_basis,
        cal.subspace_scale,
    )
    return b"|".join(b"-" if a is None else np.asarray(a, np.float32).tobytes() for a in arrays)


def with_network_residuals(
    old: list[JudgedBatch], new: list[JudgedBatch], quantile: float
) -> tuple[list[JudgedBatch], str]:
    """`new` (the same windows as `old`, run by another network) with each calibration's
    residual scale as the agent will fit it for that network: the captured one times, per
    sensor, how the new network's residuals compare with the old one's on the sampled normal
    windows of that calibration (all calibrations' where it has fewer than
    MIN_NORMAL_WINDOWS). The calibration stretch never leaves the device; the samples stand
    in for it, and they are few (some catch the start of a benign dip), so the ratio is
    estimated three ways (`_ratios`) and each group is judged under the one least in its
    favour: false alarms under the lowest (their forecast evidence at its highest), faults
    under the highest, sampled normal windows under the first. Each batch comes back split
    by group."""
    pooled_old, pooled_new = _normal(old), _normal(new)
    if pooled_old.shape[0] == 0:
        return new, "no sampled normal windows: residual scales kept as captured"
    pooled = _ratios(pooled_old, pooled_new, quantile)
    out = []
    for o, n in zip(old, new, strict=True):
        own_old, own_new = _normal([o]), _normal([n])
        ratios = (
            _ratios(own_old, own_new, quantile)
            if own_old.shape[0] >= MIN_NORMAL_WINDOWS
            else pooled
        )
        group = np.asarray(n.group)
        for name, ratio in (
            (FALSE_ALARM, ratios.min(0)),
            (FAULT, ratios.max(0)),
            (NORMAL, ratios[0]),
        ):
            rows = np.flatnonzero(group == name)
            if rows.size:
                scale = (n.calibration.residual_scale * ratio).astype(np.float32)
                cal = dataclasses.replace(n.calibration, residual_scale=scale)
                out.append(JudgedBatch(cal, n.outputs.select(rows), (name,) * int(rows.size)))
    low, high = pooled.min(0), pooled.max(0)
    return out, (
        f"residual scales for the new network from {pooled_old.shape[0]} sampled normal "
        "windows, by sensor: "
        + ", ".join(
            f"x{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in zip(pooled[0], low, high, strict=True)
        )
    )


def _normal(batches: list[JudgedBatch]) -> FloatArray:
    rows = [b.outputs.residual[np.asarray(b.group) == NORMAL] for b in batches]
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _ratios(old: FloatArray, new: FloatArray, quantile: float) -> FloatArray:
    """[3, N]: new over old residuals per sensor, as the ratio of their `quantile`s (what
    calibration takes), of their 0.9 quantiles, and the median ratio window by window."""

    def over(a: FloatArray, b: FloatArray) -> FloatArray:
        ok = b > 0
        return np.where(ok, a / np.where(ok, b, 1.0), 1.0)

    return np.stack(
        [
            over(np.quantile(new, quantile, axis=0), np.quantile(old, quantile, axis=0)),
            over(np.quantile(new, 0.9, axis=0), np.quantile(old, 0.9, axis=0)),
            np.median(over(new, old), axis=0),
        ]
    ).astype(np.float32)


def scores_by_group(batches: list[JudgedBatch], params: DecisionParams) -> dict[str, FloatArray]:
    """Every window's raw score (as the agent computes it, before smoothing), by group."""
    found: dict[str, list[FloatArray]] = {g: [] for g in GROUPS}
    for b in batches:
        scores = score_of(evidence_values(b.outputs, b.calibration, params), params)
        group = np.asarray(b.group)
        for g in GROUPS:
            found[g].append(scores[group == g])
    return {g: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for g, v in found.items()}


def summary(batches: list[JudgedBatch], params: DecisionParams) -> dict[str, GroupScores]:
    return {g: GroupScores.of(s) for g, s in scores_by_group(batches, params).items()}


def fit_tolerances(batches: list[JudgedBatch], params: DecisionParams) -> ToleranceFit:
    """Raise per-sensor tolerances until the false alarms score under FALSE_ALARM_MARGIN
    while the detected faults keep theirs (module docstring)."""
    before = summary(batches, params)
    n = batches[0].outputs.level.shape[1] if batches else 0
    if params.level_window <= 0 or n == 0:
        why = "no judged window with a calibration" if n == 0 else "the decision uses no levels"
        return ToleranceFit(params, before, before, before[FALSE_ALARM].alerting, 0, 0,
                            f"decision not fitted: {why}")  # fmt: skip
    search = _Search(batches, params, n)
    steps = search.run()
    raised = [
        f"{kind} of sensor {j} {base:g} -> {now:g}"
        for kind in TOLERANCE_KINDS
        for j, (base, now) in enumerate(
            zip(search.base[kind], (round(x, 4) for x in search.tolerance[kind]), strict=True)
        )
        if now != base
    ]
    decision = search.params() if raised else params
    after = summary(batches, decision)
    over = int((search.scores(decision)[FALSE_ALARM] >= FALSE_ALARM_MARGIN).sum())
    note = f"raised {', '.join(raised)}" if raised else "no tolerance needed raising"
    note += (
        f"; {after[FALSE_ALARM].alerting} false-alarm window(s) still at or above 1, {over} "
        f"at or above {FALSE_ALARM_MARGIN}"
    )
    if search.frozen:
        frozen = sorted(f"{k} of sensor {j}" for k, j in search.frozen)
        note += f"; held where verified faults needed them: {', '.join(frozen)}"
    if search.missed:
        note += f"; {search.missed} fault window(s) already under 1 before the fit"
    return ToleranceFit(
        decision, before, after, after[FALSE_ALARM].alerting, search.missed, steps, note
    )


class _Search:
    """The greedy multiplicative search of `fit_tolerances`."""

    def __init__(self, batches: list[JudgedBatch], params: DecisionParams, n: int) -> None:
        self.batches = batches
        self.decision = params
        self.base = {
            kind: tuple(float(x) for x in getattr(params, f"{kind}_tolerance") or (1.0,) * n)
            for kind in TOLERANCE_KINDS
        }
        self.tolerance = {kind: list(v) for kind, v in self.base.items()}
        self.frozen: set[tuple[str, int]] = set()
        first = self.scores(self.params())
        self.fault_floor = np.where(
            first[FAULT] >= 1.0, np.minimum(first[FAULT], FAULT_MARGIN), -np.inf
        )
        self.missed = int((first[FAULT] < 1.0).sum())
        # False-alarm windows the network's own evidence keeps over the margin: no fit helps.
        self.hopeless = self._network_only() >= FALSE_ALARM_MARGIN
        self.left: set[int] = set()

    def params(self, change: tuple[str, int] | None = None) -> DecisionParams:
        tolerance = {k: list(v) for k, v in self.tolerance.items()}
        if change is not None:
            kind, j = change
            tolerance[kind][j] = tolerance[kind][j] * STEP
        return dataclasses.replace(
            self.decision,
            level_tolerance=self._kept("level", tolerance["level"]),
            spread_tolerance=self._kept("spread", tolerance["spread"]),
            residual_tolerance=self._kept("residual", tolerance["residual"]),
            subspace_tolerance=self._kept("subspace", tolerance["subspace"]),
        )

    def _kept(self, kind: str, values: list[float]) -> tuple[float, ...]:
        """The tolerances as the decision keeps them: () where the base had none and none was
        raised (a field at its default is not written, so older agents still load it)."""
        if not getattr(self.decision, f"{kind}_tolerance") and all(v == 1.0 for v in values):
            return ()
        return tuple(round(x, 4) for x in values)

    def scores(self, params: DecisionParams) -> dict[str, FloatArray]:
        return scores_by_group(self.batches, params)

    def _network_only(self) -> FloatArray:
        """False-alarm scores with every kind of evidence a tolerance divides at zero."""
        parts = []
        for b in self.batches:
            values = evidence_values(b.outputs, b.calibration, self.decision)
            for kind in ("level", "joint", "spread", "forecast", "subspace"):
                if kind in values:
                    values[kind] = np.zeros_like(values[kind])
            parts.append(score_of(values, self.decision)[np.asarray(b.group) == FALSE_ALARM])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def _window(self, index: int) -> tuple[JudgedBatch, int]:
        """The batch and row of the `index`-th false-alarm window."""
        for b in self.batches:
            rows = np.flatnonzero(np.asarray(b.group) == FALSE_ALARM)
            if index < rows.size:
                return b, int(rows[index])
            index -= rows.size
        raise IndexError(index)

    def candidates(self, index: int) -> list[tuple[str, int]]:
        """(kind, sensor) of the false-alarm window's deviations, largest first."""
        b, row = self._window(index)
        params = self.params()
        one = b.outputs.select(np.array([row]))
        devs = {
            "level": np.abs(level_deviation(one.level, b.calibration, params.level_tolerance)[0]),
            "spread": spread_deviation(one.spread, b.calibration, params.spread_tolerance)[0],
            "residual": forecast_deviation(one, b.calibration, params)[0],
            "subspace": (
                subspace_deviation(one.level, b.calibration, params.subspace_tolerance)[0]
                if params.subspace and b.calibration.subspace_basis is not None
                else np.zeros(one.level.shape[1], dtype=np.float32)
            ),
        }
        devs = {k: v / getattr(params, THRESHOLD_OF[k]) for k, v in devs.items()}
        ranked = [
            (-float(devs[kind][j]), k, j)
            for k, kind in enumerate(TOLERANCE_KINDS)
            for j in range(devs[kind].size)
            if (kind, j) not in self.frozen
            and self.tolerance[kind][j] * STEP <= MAX_TOLERANCE
            and devs[kind][j] > 0
        ]
        return [(TOLERANCE_KINDS[k], j) for _, k, j in sorted(ranked)]

    def run(self) -> int:
        steps = 0
        while steps < MAX_STEPS:
            alarms = self.scores(self.params())[FALSE_ALARM]
            pending = [
                i
                for i in np.argsort(-alarms, kind="stable")
                if alarms[i] >= FALSE_ALARM_MARGIN and not self.hopeless[i] and i not in self.left
            ]
            if not pending:
                break
            worst = int(pending[0])
            if not self._step(worst, float(alarms[worst])):
                self.left.add(worst)
            steps += 1
        return steps

    def _step(self, worst: int, score: float) -> bool:
        """One step lowering false-alarm window `worst`; False when none can."""
        for change in self.candidates(worst):
            trial = self.scores(self.params(change))
            if trial[FALSE_ALARM][worst] >= score:
                continue  # that deviation does not carry this window's score
            if (trial[FAULT] < self.fault_floor).any():
                self.frozen.add(change)
                continue
            kind, j = change
            self.tolerance[kind][j] *= STEP
            return True
        return False
