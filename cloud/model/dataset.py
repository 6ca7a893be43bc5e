"""Training windows from sensor tables, normalised per episode exactly as a site calibrates.

An episode is one experiment file, or a slice of a long unlabelled recording; each is
normalised with `fit_input_normalisation` on its first `calibration_rows` rows, the routine
the agent runs, so the network learns in the space it will see in the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud.model.data import SensorTable
from edge_agent.calibration import fit_input_normalisation
from edge_agent.errors import InvalidInput
from edge_agent.windowing import (
    AlignedSeries,
    FloatArray,
    WindowSpec,
    align_to_grid,
    windows_ending_at,
)


@dataclass(frozen=True)
class Episode:
    """One aligned stretch with per-slot labels (NaN where unlabelled)."""

    name: str
    series: AlignedSeries
    labels: FloatArray


@dataclass(frozen=True)
class WindowSet:
    """Windows in site-normalised units: z [W, T, N], mask, label (-1 = unknown)."""

    z: FloatArray
    mask: FloatArray
    label: FloatArray

    @property
    def size(self) -> int:
        return int(self.z.shape[0])


def episodes_from_tables(
    tables: Sequence[SensorTable], spec: WindowSpec, calibration_rows: int
) -> list[Episode]:
    """Align every table; cut long recordings into episodes a few calibration stretches long."""
    episodes = []
    span = 3 * calibration_rows
    for table in tables:
        series = align_to_grid(table.times, table.values, spec.period_s, spec.max_staleness_s)
        labels = _slot_labels(table, series)
        if series.slots <= calibration_rows + spec.length:
            # Short: kept when it calibrates on two full windows or more, as `episode_evidence`
            # needs (on min(calibration_rows, half its rows)), and has as many rows to score.
            if min(calibration_rows, series.slots // 2) > spec.length:
                episodes.append(Episode(str(table.path), series, labels))
            continue
        if table.labels is not None or series.slots <= span:
            episodes.append(Episode(str(table.path), series, labels))
            continue
        for start in range(0, series.slots - span + 1, calibration_rows):
            part = slice(start, start + span)
            piece = AlignedSeries(
                start=series.start + start * spec.period_s,
                period_s=spec.period_s,
                values=series.values[part],
                mask=series.mask[part],
                row_slot=np.arange(span, dtype=np.int64),
            )
            episodes.append(Episode(f"{table.path}[{start}:]", piece, labels[part]))
    if not episodes:
        raise InvalidInput("training data: no file is long enough for one window")
    return episodes


def training_scale(
    episodes: Sequence[Episode], calibration_rows: int
) -> tuple[FloatArray, FloatArray]:
    """The constants baked into the net: pooled median of all valid readings, and the typical
    spread *within* a site (the median over episodes of each calibration stretch's standard
    deviation). Sites differ in level far more than they vary within themselves (SKAB: flow
    at 32 or 125 l/min, 0.4 of noise), and this spread is what the calibration's floor is a
    share of: a pooled spread would floor every sensor far above its own noise."""
    values = np.concatenate([e.series.values for e in episodes])
    mask = np.concatenate([e.series.mask for e in episodes])
    n = values.shape[1]
    center = np.zeros(n, dtype=np.float32)
    scale = np.ones(n, dtype=np.float32)
    for j in range(n):
        valid = values[mask[:, j] > 0, j]
        if valid.size:
            center[j] = float(np.median(valid))
        spreads = []
        for e in episodes:
            cal = min(calibration_rows, e.series.slots // 2)
            part = e.series.values[:cal, j][e.series.mask[:cal, j] > 0]
            if part.size > 1 and float(part.std()) > 0:
                spreads.append(float(part.std()))
        pooled = float(valid.std()) if valid.size else 0.0
        scale[j] = max(float(np.median(spreads)) if spreads else pooled, 1e-6)
    return center, scale


def windows_from_episodes(
    episodes: Sequence[Episode],
    spec: WindowSpec,
    calibration_rows: int,
    train_scale: FloatArray,
    scale_floor: float,
) -> WindowSet:
    """Windows every `stride` slots of every episode, normalised by its own calibration."""
    zs, masks, labels = [], [], []
    for ep in episodes:
        cal = min(calibration_rows, ep.series.slots // 2)
        center, scale = fit_input_normalisation(
            ep.series.values[:cal], ep.series.mask[:cal], train_scale, scale_floor
        )
        ends = np.arange(spec.length - 1, ep.series.slots, spec.stride, dtype=np.int64)
        x, m = windows_ending_at(ep.series, ends, spec.length)
        zs.append(((x - center) / scale).astype(np.float32))
        masks.append(m)
        lab = ep.labels[ends]
        labels.append(np.where(np.isnan(lab), -1.0, lab).astype(np.float32))
    return WindowSet(np.concatenate(zs), np.concatenate(masks), np.concatenate(labels))


def _slot_labels(table: SensorTable, series: AlignedSeries) -> FloatArray:
    labels = np.full(series.slots, np.nan, dtype=np.float32)
    if table.labels is None:
        return labels
    # As-of, like the readings: a slot carries the label of the latest row feeding it.
    labels[series.row_slot] = (table.labels > 0.5).astype(np.float32)
    filled = np.isnan(labels)
    if filled.any():
        idx = np.where(~filled, np.arange(series.slots), 0)
        np.maximum.accumulate(idx, out=idx)
        labels = labels[idx]
    return labels
