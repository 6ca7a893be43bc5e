"""The `trend` evidence: each sensor's rise across the window, counted where it leads away."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.bundle import Decision
from edge_agent.calibration import (
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    sensor_evidence,
    thresholds_of,
    trend_deviation,
    window_trend,
)

pytestmark = pytest.mark.unit

ROWS = 120


def _calibration(n: int) -> SiteCalibration:
    ones = np.ones(n, dtype=np.float32)
    return SiteCalibration(
        ones * 0,
        ones,
        ones,
        100,
        level_center=ones * 0,
        level_scale=ones,
        level_precision=np.eye(n, dtype=np.float32),
        spread_center=ones,
    )


def test_the_rise_is_the_least_squares_line_across_the_window_in_site_units() -> None:
    x = np.zeros((2, ROWS, 3), dtype=np.float32)
    x[0, :, 0] = np.linspace(0.0, 6.0, ROWS)  # a ramp of 6 site units
    x[1, :, 1] = np.linspace(0.0, -3.0, ROWS)
    x[1, ROWS // 2 :, 2] = 4.0  # a step in the middle: 1.5 times its height
    noise = np.random.default_rng(0).normal(scale=0.01, size=x.shape).astype(np.float32)
    mask = np.ones_like(x)
    mask[0, :50, 0] = 0.0  # missing rows do not bend the line
    mask[0, :, 1] = 0.0
    mask[0, -1, 1] = 1.0  # one reading: no line
    center, scale = np.full(3, 7.0, np.float32), np.full(3, 2.0, np.float32)
    rise = window_trend((x + noise) * scale + center, mask, center, scale)
    assert rise[0, 0] == pytest.approx(6.0, abs=0.02)
    assert np.isnan(rise[0, 1])
    assert rise[1, 1] == pytest.approx(-3.0, abs=0.02)
    assert rise[1, 2] == pytest.approx(1.5 * 4.0, rel=0.01)
    assert abs(rise[0, 2]) < 0.02


def test_a_rise_back_towards_normal_counts_nothing_and_one_away_leads() -> None:
    n = 4
    cal = _calibration(n)
    zeros = np.zeros((1, n), dtype=np.float32)
    level = np.asarray([[3.0, -3.0, 3.0, 0.5]], dtype=np.float32)
    trend = np.asarray([[2.0, 4.0, -5.0, np.nan]], dtype=np.float32)
    one = WindowOutputs(np.zeros(1, np.float32), zeros, zeros, level, zeros + 1, None, trend)
    dev = trend_deviation(one, cal, (1.0, 1.0, 1.0, 2.0))
    # sensor 0 rises away (+, above); 1 rises back up to normal; 2 falls back; 3 no line
    assert dev[0].tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    params = DecisionParams(trend=True, trend_threshold=1.0)
    assert "trend" in thresholds_of(params) and "trend" not in thresholds_of(DecisionParams())
    values = evidence_values(one, cal, params)
    assert values["trend"][0] == pytest.approx(2.0)
    assert "trend" not in evidence_values(one, cal, DecisionParams())
    share = sensor_evidence(one, cal, params, values)  # the trend drives the score
    assert int(share.argmax()) == 0
    none = WindowOutputs(np.zeros(1, np.float32), zeros, zeros, level, zeros + 1)
    assert trend_deviation(none, cal).max() == 0.0


def test_manifests_without_the_field_keep_the_kind_off() -> None:
    assert Decision.model_fields["trend"].default is False
    with pytest.raises(Exception, match="trend_threshold"):
        DecisionParams(trend_threshold=0.0)
    with pytest.raises(Exception, match="trend_tolerance"):
        DecisionParams(trend_tolerance=(1.0, 0.0))
