"""The noise floor of the shadow comparison: the incumbent against itself recalibrated,
compared on the slots both runs score, and merged over assets by the windows measured."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.shadow import Comparison, _agreement, later, merge
from edge_agent.windowing import AlignedSeries

pytestmark = pytest.mark.unit


def test_later_drops_the_first_rows_and_keeps_the_grid() -> None:
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    series = AlignedSeries(100.0, 2.0, values, np.ones_like(values), np.arange(10))
    tail = later(series, 4)
    assert tail.start == 108.0 and tail.slots == 6
    assert tail.values[0].tolist() == [8.0, 9.0]
    assert tail.row_slot.tolist() == list(range(6))


def test_agreement_compares_the_slots_both_runs_score_the_newest() -> None:
    # The first run scores 6 slots, the recalibrated one only the last 4 of them.
    first = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    second = np.array([0, 0, 1, 1], dtype=bool)
    windows, agreement, difference = _agreement(first, second)
    assert windows == 4
    assert agreement == pytest.approx(0.75)  # [0,0,1,0] vs [0,0,1,1]
    assert difference == pytest.approx(0.25)
    assert _agreement(first, np.array([], dtype=bool)) == (0, 0.0, 0.0)


def _part(windows: int, floor: float, floor_windows: int) -> Comparison:
    return Comparison(windows, 0.9, 0.1, 0.1, 2.0, 2.0, floor, 0.05, floor_windows)


def test_merge_weights_the_floor_by_the_windows_it_was_measured_on() -> None:
    merged = merge([_part(100, 0.8, 30), _part(100, 1.0, 90), _part(50, 0.0, 0)])
    assert merged is not None
    assert merged.self_agreement == pytest.approx((0.8 * 30 + 1.0 * 90) / 120)
    assert merged.self_windows == 120
    unmeasured = merge([_part(100, 0.0, 0)])
    assert unmeasured is not None and unmeasured.self_agreement == 0.0
