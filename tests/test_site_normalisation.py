"""The site normalisation stays finite whatever reaches it: readings past float32's range are
refused with the sensor named, large ones do not overflow, and network inputs are bounded."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.calibration import Z_LIMIT, fit_input_normalisation, to_network_space
from edge_agent.errors import InvalidInput

pytestmark = pytest.mark.unit


def test_a_reading_past_float32s_range_is_refused_naming_the_sensor() -> None:
    values = np.ones((50, 3), dtype=np.float32)
    values[:, 1] = np.linspace(0, 1, 50)
    values[7, 2] = np.inf  # 1e39 cast to float32: a calibration of NaN before
    with pytest.raises(InvalidInput, match=r"sensor 2 .*beyond float32"):
        fit_input_normalisation(values, np.ones_like(values), np.ones(3, np.float32), 0.1)


def test_large_readings_give_a_finite_scale() -> None:
    """float32 squares of 1e20 overflow; the spread is taken in float64."""
    values = np.full((50, 2), 1.0, dtype=np.float32)
    values[::2, 0] = np.float32(1e20)
    center, scale = fit_input_normalisation(
        values, np.ones_like(values), np.ones(2, np.float32), 0.1
    )
    assert np.isfinite(center).all() and np.isfinite(scale).all(), (center, scale)


def test_network_inputs_are_bounded_and_missing_stays_missing() -> None:
    x = np.array([[1.0, np.nan, 1e15, -3.4e38]], dtype=np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    net = to_network_space(x, zeros, np.full(4, 1e-6, np.float32), zeros, ones)
    assert net[0, 0] == Z_LIMIT and np.isnan(net[0, 1])
    assert net[0, 2] == Z_LIMIT and net[0, 3] == -Z_LIMIT
