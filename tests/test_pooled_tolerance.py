"""Tolerances pooled over held-out episodes (`DecisionParams.pooled_tolerance`)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.model.thresholds import KINDS_POOLED, EpisodeEvidence, with_tolerance
from edge_agent.bundle import Decision
from edge_agent.calibration import DecisionParams

pytestmark = pytest.mark.unit


def _episodes() -> list[EpisodeEvidence]:
    """Three episodes of two sensors; sensor 1 wanders far (8 times) in one of them only."""
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        dev = rng.normal(size=(2000, 2)).astype(np.float32) * 2.0
        if seed == 0:
            dev[:, 1] *= 8.0
        values = {"level": np.abs(dev).max(axis=1)}
        normal = np.ones(2000, dtype=bool)
        eye = np.eye(2, dtype=np.float32)
        out.append(EpisodeEvidence(f"e{seed}", values, normal, dev, eye, dev, dev))
    return out


def test_pooling_gives_a_sensor_that_wanders_in_one_recording_its_room() -> None:
    episodes = _episodes()
    _, median = with_tolerance(episodes, 0.05)
    fitted, pooled = with_tolerance(episodes, 0.05, pooled=True)
    every = np.abs(np.concatenate([e.deviation for e in episodes]))  # type: ignore[misc]
    want = np.maximum(1.0, np.quantile(every, 0.95, axis=0))
    for kind in ("level", "spread", "subspace"):
        name = f"{kind}_tolerance"
        if kind in KINDS_POOLED:
            assert pooled[name] == pytest.approx(tuple(want), rel=1e-3), name
        else:
            assert pooled[name] == median[name], name
    # the median over episodes does not see the one wandering recording; the pool does
    m0, m1 = median["level_tolerance"]
    p0, p1 = pooled["level_tolerance"]
    assert m1 / m0 < 1.2 and p1 / p0 > 3.0, (median, pooled)
    assert fitted[0].values["level"] == pytest.approx(
        np.abs(episodes[0].deviation / np.asarray([p0, p1], np.float32)).max(axis=1),  # type: ignore[operator]
        rel=1e-3,
    )


def test_off_by_default_and_for_manifests_without_the_field() -> None:
    assert "level" in KINDS_POOLED
    assert Decision.model_fields["pooled_tolerance"].default is False
    assert DecisionParams().pooled_tolerance is False
