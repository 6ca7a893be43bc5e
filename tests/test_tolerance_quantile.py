"""Per-sensor tolerances fitted further out in the tail (`DecisionParams.tolerance_quantile`)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.model.thresholds import EpisodeEvidence, with_tolerance
from edge_agent.bundle import Decision
from edge_agent.calibration import DecisionParams

pytestmark = pytest.mark.unit


def _episodes() -> list[EpisodeEvidence]:
    """Three episodes of two sensors: one with Gaussian deviations, one heavy-tailed (a sensor
    that mostly holds and now and then wanders far)."""
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        quiet = rng.normal(size=4000)
        wander = rng.normal(size=4000) * np.where(rng.random(4000) < 0.03, 8.0, 1.0)
        dev = np.stack([quiet, wander], axis=1).astype(np.float32) * 2.0
        values = {"level": np.abs(dev).max(axis=1)}
        out.append(
            EpisodeEvidence(
                f"e{seed}", values, np.ones(4000, bool), dev, np.eye(2, dtype=np.float32), dev
            )
        )
    return out


def test_the_tail_quantile_fits_each_sensor_where_it_wanders_at_worst() -> None:
    episodes = _episodes()
    _, default = with_tolerance(episodes, 0.05)
    _, tail = with_tolerance(episodes, 0.05, 0.995)
    for name, q in (("level_tolerance", 0.95), ("spread_tolerance", 0.95)):
        want = np.median([np.quantile(np.abs(e.deviation), q, axis=0) for e in episodes], axis=0)
        assert default[name] == pytest.approx(tuple(want), rel=1e-3), name
    want = np.median([np.quantile(np.abs(e.deviation), 0.995, axis=0) for e in episodes], axis=0)
    assert tail["level_tolerance"] == pytest.approx(tuple(want), rel=1e-3)
    # At 0.95 the two sensors look alike; out in the tail the wandering one needs far more room.
    d0, d1 = default["level_tolerance"]
    t0, t1 = tail["level_tolerance"]
    assert d1 / d0 < 1.5 and t1 / t0 > 2.5, (default, tail)


def test_zero_keeps_the_old_fit_and_manifests_without_the_field_use_it() -> None:
    assert DecisionParams().tolerance_quantile == 0.0
    assert Decision.model_fields["tolerance_quantile"].default == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(Exception, match="tolerance_quantile"):
            DecisionParams(tolerance_quantile=bad)
