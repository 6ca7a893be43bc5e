"""Scoring a stretch of sensor history with a model: calibrate on its start, score the rest.

Used by `autoglm model evaluate/predict` for back-testing and by the agent after installing a
model, so both run one routine. Every score depends only on its row and earlier rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_agent.bundle import Manifest
from edge_agent.calibration import (
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    earlier_level,
    fault_score,
    fit_input_normalisation,
    fit_level_normal,
    fit_residual_scale,
    fit_spread_normal,
    fit_subspace,
    recent_stats,
    smooth_causal,
    to_network_space,
)
from edge_agent.errors import InvalidInput
from edge_agent.windowing import AlignedSeries, FloatArray, IndexArray, windows_ending_at

BATCH = 256


class WindowModel(Protocol):
    """Anything that maps windows [B, T, N] and masks to the network's three outputs."""

    def run(
        self, window: FloatArray, mask: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """fault_prob [B], residual [B, N], contribution [B, N]."""
        ...


@dataclass(frozen=True)
class ModelFrame:
    """What scoring needs to know about a model (from its manifest)."""

    window: int
    net_center: FloatArray
    net_scale: FloatArray
    training_scale: FloatArray
    decision: DecisionParams


def frame_of(manifest: Manifest) -> ModelFrame:
    """The scoring frame a bundle's manifest describes."""
    center = np.asarray(manifest.normalisation.center, dtype=np.float32)
    for name in (
        "level_tolerance",
        "spread_tolerance",
        "residual_tolerance",
        "subspace_tolerance",
    ):
        tolerance = getattr(manifest.decision, name)
        if tolerance and len(tolerance) != len(manifest.sensors):
            raise InvalidInput(
                f"manifest: decision.{name} has {len(tolerance)} values for "
                f"{len(manifest.sensors)} sensors"
            )
    scale = np.asarray(manifest.normalisation.scale, dtype=np.float32)
    return ModelFrame(
        window=manifest.window.length,
        net_center=center,
        net_scale=scale,
        training_scale=scale,
        decision=DecisionParams(**manifest.decision.model_dump()),
    )


@dataclass(frozen=True)
class SlotScores:
    """Per grid slot from the first scored slot on: smoothed score, flag, contributions."""

    first_slot: int
    score: FloatArray
    anomaly: np.ndarray
    contribution: FloatArray
    calibration: SiteCalibration


def calibrate(
    model: WindowModel, frame: ModelFrame, series: AlignedSeries, calibration_slots: int
) -> tuple[SiteCalibration, FloatArray, IndexArray, WindowOutputs]:
    """Fit the site calibration on slots [0, calibration_slots) of `series`.

    Returns the calibration, the raw scores of the calibration windows (they seed the
    smoothing), and the window ends and outputs it ran (so a caller scoring the same series
    need not run them twice)."""
    if calibration_slots < 2:
        raise InvalidInput(f"calibration needs at least 2 rows, got {calibration_slots}")
    if calibration_slots > series.slots:
        raise InvalidInput(
            f"calibration needs {calibration_slots} slots, the series has {series.slots}"
        )
    center, scale = fit_input_normalisation(
        series.values[:calibration_slots],
        series.mask[:calibration_slots],
        frame.training_scale,
        frame.decision.scale_floor,
    )
    cal_first = min(frame.window - 1, calibration_slots - 1)
    if frame.decision.level_window > 0 and calibration_slots - cal_first < 2:
        raise InvalidInput(
            f"calibration on {calibration_slots} rows: the model's windows are "
            f"{frame.window} rows long, so it needs at least {frame.window + 1} rows"
        )
    ends = np.arange(cal_first, series.slots, dtype=np.int64)
    outputs = run_windows(model, frame, series, ends, center, scale)
    in_cal = outputs.select(ends < calibration_slots)
    residual_scale = fit_residual_scale(in_cal.residual, frame.decision.residual_quantile)
    calibration = SiteCalibration(center, scale, residual_scale, calibration_slots)
    if frame.decision.level_window > 0:
        level_center, level_scale, level_precision = fit_level_normal(in_cal.level)
        calibration = dataclasses.replace(
            calibration,
            level_center=level_center,
            level_scale=level_scale,
            level_precision=level_precision,
            spread_center=fit_spread_normal(in_cal.spread),
        )
        subspace = fit_subspace(in_cal.level) if frame.decision.subspace else None
        if subspace is not None:
            calibration = dataclasses.replace(
                calibration,
                subspace_center=subspace[0],
                subspace_basis=subspace[1],
                subspace_scale=subspace[2],
            )
    raw = fault_score(in_cal, calibration, frame.decision)
    return calibration, raw, ends, outputs


def calibrate_and_score(
    model: WindowModel, frame: ModelFrame, series: AlignedSeries, calibration_slots: int
) -> SlotScores:
    """Calibrate on slots [0, calibration_slots), score every slot from there on."""
    if calibration_slots >= series.slots:
        raise InvalidInput(
            f"calibration stretch ({calibration_slots} slots) leaves nothing to score "
            f"({series.slots} slots)"
        )
    calibration, _, ends, outputs = calibrate(model, frame, series, calibration_slots)
    raw = fault_score(outputs, calibration, frame.decision)
    smoothed = smooth_causal(raw, frame.decision.smoothing)
    scored = ends >= calibration_slots
    return SlotScores(
        first_slot=calibration_slots,
        score=smoothed[scored],
        anomaly=smoothed[scored] >= 1.0,
        contribution=outputs.contribution[scored],
        calibration=calibration,
    )


def run_windows(
    model: WindowModel,
    frame: ModelFrame,
    series: AlignedSeries,
    ends: IndexArray,
    center: FloatArray,
    scale: FloatArray,
) -> WindowOutputs:
    """Run the model on the windows ending at `ends`, in batches."""
    parts = []
    for start in range(0, ends.size, BATCH):
        x, m = windows_ending_at(series, ends[start : start + BATCH], frame.window)
        x = to_network_space(x, center, scale, frame.net_center, frame.net_scale)
        parts.append(window_outputs(model, frame, x, m))
    return WindowOutputs.concat(parts)


def window_outputs(
    model: WindowModel, frame: ModelFrame, x: FloatArray, m: FloatArray
) -> WindowOutputs:
    """The model's outputs and the recent levels for windows already in network space."""
    p, r, c = model.run(x, m)
    return WindowOutputs(p, r, c, *window_statistics(frame, x, m))


def window_statistics(
    frame: ModelFrame, x: FloatArray, m: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """What the decision reads off windows in network space besides the network's outputs:
    the recent level and spread of each sensor, and its level before (`forecast_away`)."""
    rows = frame.decision.level_window
    level, spread = recent_stats(x, m, frame.net_center, frame.net_scale, rows)
    before = None
    if frame.decision.forecast_away and rows > 0:
        before = earlier_level(x, m, frame.net_center, frame.net_scale, rows)
    return level, spread, before


def row_scores(
    slots: SlotScores, row_slot: IndexArray, first_row: int
) -> tuple[FloatArray, np.ndarray]:
    """Scores and flags for input rows from `first_row` on (each row: its grid slot)."""
    idx = row_slot[first_row:] - slots.first_slot
    if (idx < 0).any():
        raise InvalidInput("rows to score fall inside the calibration stretch")
    return slots.score[idx], slots.anomaly[idx]
