"""Alignment of sensor readings onto the model's sampling grid, and windows cut from it.

This is a contract module: training (in `cloud`) and the agent use the same code, so a model
sees in the field exactly what it saw in training.

Alignment is *as-of*: the value of a sensor at grid time g is its latest reading at or before
g, if that reading is at most `max_staleness_s` old; otherwise the slot is invalid (mask 0)
and holds the last known value (or 0 before the first reading). Nothing from after g is ever
used, which keeps every score causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.errors import InvalidInput

FloatArray = npt.NDArray[np.float32]
TimeArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SensorSchema:
    """The ordered sensors a model reads, with their units ("" where unknown)."""

    names: tuple[str, ...]
    units: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise InvalidInput("sensor schema: no sensors")
        if len(set(self.names)) != len(self.names):
            raise InvalidInput(f"sensor schema: duplicate sensor names in {list(self.names)}")
        if len(self.units) != len(self.names):
            raise InvalidInput(
                f"sensor schema: {len(self.names)} sensors but {len(self.units)} units"
            )

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class WindowSpec:
    """How windows are cut: `length` grid steps of `period_s` seconds, one every `stride`."""

    length: int
    stride: int
    period_s: float
    max_staleness_s: float

    def __post_init__(self) -> None:
        if self.length < 2 or self.stride < 1:
            raise InvalidInput(f"window: length {self.length} / stride {self.stride} too small")
        if not self.period_s > 0:
            raise InvalidInput(f"window: sampling period must be > 0, got {self.period_s}")
        if self.max_staleness_s < 0:
            raise InvalidInput(f"window: max staleness must be >= 0, got {self.max_staleness_s}")


@dataclass(frozen=True)
class AlignedSeries:
    """Readings on a regular grid: `values` and `mask` are [K, N]; `row_slot[i]` is the grid
    slot whose window scores input row i."""

    start: float
    period_s: float
    values: FloatArray
    mask: FloatArray
    row_slot: IndexArray

    @property
    def slots(self) -> int:
        return int(self.values.shape[0])


def align_to_grid(
    times: TimeArray, values: FloatArray, period_s: float, max_staleness_s: float
) -> AlignedSeries:
    """Align rows (`times` ascending seconds, `values` [R, N] with NaN for a missing cell)."""
    if times.ndim != 1 or values.ndim != 2 or values.shape[0] != times.shape[0]:
        raise InvalidInput(f"align: {times.shape[0]} timestamps for {values.shape[0]} rows")
    if times.size == 0:
        raise InvalidInput("align: no rows")
    if np.any(np.diff(times) < 0):
        raise InvalidInput("align: timestamps are not in ascending order")
    start = float(times[0])
    # A row at time t feeds slot floor((t - start) / period); tiny jitter is absorbed.
    row_slot = np.floor((times - start) / period_s + 1e-6).astype(np.int64)
    slots = int(row_slot[-1]) + 1
    grid = start + np.arange(slots, dtype=np.float64) * period_s
    n = values.shape[1]
    out = np.zeros((slots, n), dtype=np.float32)
    mask = np.zeros((slots, n), dtype=np.float32)
    for j in range(n):
        column = values[:, j]
        present = ~np.isnan(column)
        if not present.any():
            continue
        t_present = times[present]
        v_present = column[present]
        # Index of the latest reading at or before each grid time.
        latest = np.searchsorted(t_present, grid + 1e-9, side="right") - 1
        has = latest >= 0
        idx = np.clip(latest, 0, None)
        fresh = has & (grid - t_present[idx] <= max_staleness_s + 1e-9)
        out[:, j] = np.where(has, v_present[idx], 0.0)
        mask[:, j] = fresh.astype(np.float32)
    return AlignedSeries(start=start, period_s=period_s, values=out, mask=mask, row_slot=row_slot)


def windows_ending_at(
    series: AlignedSeries, ends: IndexArray, length: int
) -> tuple[FloatArray, FloatArray]:
    """Windows [B, length, N] whose last step is slot `ends[b]`; steps before slot 0 are
    invalid (mask 0) and repeat the first slot's values."""
    offsets = np.arange(-length + 1, 1, dtype=np.int64)
    idx = ends[:, None] + offsets[None, :]
    before = idx < 0
    idx = np.clip(idx, 0, series.slots - 1)
    x = series.values[idx]
    m = series.mask[idx].copy()
    m[before] = 0.0
    return x, m


def strided_ends(slots: int, spec: WindowSpec, first: int = 0) -> IndexArray:
    """Last slots of the full windows cut every `stride` steps from slot `first` on."""
    begin = max(first, spec.length - 1)
    return np.arange(begin, slots, spec.stride, dtype=np.int64)
