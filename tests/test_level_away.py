"""`DecisionParams.level_away`: level tolerances pooled over held-out episodes, and level
evidence only from sensors not coming back to normal."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.model.thresholds import KINDS_POOLED, EpisodeEvidence, with_tolerance
from edge_agent.bundle import Decision
from edge_agent.calibration import (
    LEVEL_BACK,
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    level_away,
)

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


def test_manifests_without_the_field_are_off() -> None:
    assert "level" in KINDS_POOLED
    assert Decision.model_fields["level_away"].default is False


def _site(level: list[float], before: list[float]) -> tuple[WindowOutputs, SiteCalibration]:
    n = len(level)
    out = WindowOutputs(
        np.zeros(1, np.float32),
        np.zeros((1, n), np.float32),
        np.zeros((1, n), np.float32),
        np.asarray([level], np.float32),
        np.ones((1, n), np.float32),
        np.asarray([before], np.float32),
    )
    one = np.ones(n, np.float32)
    cal = SiteCalibration(one, one, one, 100, one * 0, one, np.eye(n, dtype=np.float32), one)
    return out, cal


def test_the_gate_drops_only_sensors_coming_back_to_normal() -> None:
    # 0: a fault ending (level 2 after 10 before); 1: leaving normal (8 after 2); 2: a step
    # held (6 after 6, and a little under: not back); 3: no level before (NaN): kept
    level = [2.0, 8.0, 6.0 * LEVEL_BACK + 0.1, 5.0]
    out, cal = _site(level, [10.0, 2.0, 6.0, float("nan")])
    on = DecisionParams(level_away=True)
    dev = np.asarray([level], np.float32)
    gated = level_away(dev, out, cal, on)
    assert gated[0].tolist() == pytest.approx([0.0, 8.0, level[2], 5.0])
    assert level_away(dev, out, cal, DecisionParams(level_away=False)) is dev
    # the level evidence is the largest kept deviation, on and off
    assert evidence_values(out, cal, on)["level"][0] == pytest.approx(8.0)
    out, cal = _site([9.0, 1.0, 1.0, 1.0], [20.0, 1.0, 1.0, 1.0])  # 0 coming back
    off = evidence_values(out, cal, DecisionParams(level_away=False))["level"][0]
    assert off == pytest.approx(9.0)
    assert evidence_values(out, cal, on)["level"][0] == pytest.approx(1.0)
