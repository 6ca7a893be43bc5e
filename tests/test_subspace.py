"""The `subspace` evidence: a PCA of the calibration levels, and each sensor's residual off it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import Decision
from edge_agent.calibration import (
    LEVEL_SCALE_FLOOR,
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    fit_subspace,
    sensor_evidence,
    subspace_deviation,
    thresholds_of,
)
from edge_agent.calibration_store import CalibrationStore

pytestmark = pytest.mark.unit


def _levels(variances: list[float], windows: int = 400, seed: int = 0) -> np.ndarray:
    """Levels [windows, N] whose principal variances are exactly `variances` (N of them),
    along a random orthonormal basis, centred on 5."""
    rng = np.random.default_rng(seed)
    n = len(variances)
    basis, _ = np.linalg.qr(rng.normal(size=(n, n)))
    scores, _ = np.linalg.qr(rng.normal(size=(windows, n)))  # orthonormal columns
    scores = (scores - scores.mean(axis=0)) * np.sqrt(windows)
    return (5.0 + (scores * np.sqrt(variances)) @ basis.T).astype(np.float32)


def _calibration(level: np.ndarray) -> SiteCalibration:
    fitted = fit_subspace(level)
    assert fitted is not None
    n = level.shape[1]
    ones = np.ones(n, dtype=np.float32)
    center, basis, scale = fitted
    return SiteCalibration(
        ones * 0,
        ones,
        ones,
        100,
        level_center=center,
        level_scale=ones,
        level_precision=np.eye(n, dtype=np.float32),
        spread_center=ones,
        subspace_center=center,
        subspace_basis=basis,
        subspace_scale=scale,
    )


def test_k_counts_the_components_above_ten_times_the_median_eigenvalue() -> None:
    # floor about 0.2 (the median centre adds a small direction): 1 % of the variance stays
    fitted = fit_subspace(_levels([400.0, 100.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1]))
    assert fitted is not None
    center, basis, scale = fitted
    assert basis.shape == (8, 3)
    assert np.allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    assert center.shape == scale.shape == (8,) and (scale >= LEVEL_SCALE_FLOOR).all()
    # median (10 + 3) / 2 of six: only the first clears 65
    one = fit_subspace(_levels([70.0, 35.0, 10.0, 3.0, 1.0, 1.0]))
    assert one is not None and one[1].shape == (6, 1)


def test_three_strong_factors_among_twenty_noisy_sensors_give_k_three() -> None:
    rng = np.random.default_rng(3)
    factors = rng.normal(0.0, 2.0, size=(400, 3))
    level = factors @ rng.normal(size=(3, 20)) + rng.normal(0.0, 0.3, size=(400, 20))
    fitted = fit_subspace(level.astype(np.float32))
    assert fitted is not None and fitted[1].shape == (20, 3)


def test_pure_noise_keeps_one_component() -> None:
    rng = np.random.default_rng(4)
    fitted = fit_subspace(rng.normal(size=(300, 20)).astype(np.float32))
    assert fitted is not None and fitted[1].shape == (20, 1)  # none above: at least 1


def test_fewer_windows_than_sensors_do_not_keep_every_direction() -> None:
    # 6 windows of 12 noisy sensors: 5 non-zero eigenvalues, 7 zeros past the rank. A floor
    # from all 12 is 0 and kept all 5 (nothing left as residual).
    rng = np.random.default_rng(5)
    fitted = fit_subspace(rng.normal(size=(6, 12)).astype(np.float32))
    assert fitted is not None and fitted[1].shape[1] == 1, fitted[1].shape


def test_four_sensors_is_the_fewest_the_kind_runs_on() -> None:
    # with N >= 4 the bound N - 2 never binds: N - 1 eigenvalues above 10 medians cannot be
    fitted = fit_subspace(_levels([100.0, 1.0, 0.1, 0.1]))
    assert fitted is not None and fitted[1].shape == (4, 1)


def test_off_for_three_sensors_or_fewer_and_for_levels_that_do_not_vary() -> None:
    assert fit_subspace(_levels([5.0, 1.0, 0.01])) is None
    assert fit_subspace(_levels([5.0, 1.0])) is None
    assert fit_subspace(_levels([5.0])) is None
    assert fit_subspace(np.full((50, 4), 3.0, dtype=np.float32)) is None


def test_a_level_in_the_subspace_has_no_residual_and_one_off_it_leads() -> None:
    level = _levels([400.0, 100.0, 0.1, 0.1, 0.1, 0.1])  # floor about 1: k = 2
    cal = _calibration(level)
    assert cal.subspace_basis is not None and cal.subspace_center is not None
    inside = cal.subspace_center + cal.subspace_basis @ np.asarray([4.0, -3.0])
    off = inside.copy()
    off[4] += 6.0  # one sensor leaves the pattern
    rows = np.stack([inside, off, np.full(6, np.nan)]).astype(np.float32)
    dev = subspace_deviation(rows, cal)
    assert dev[0].max() < 1e-4, dev[0]
    assert dev[2].max() < 1e-4  # no readings: at the centre
    assert int(dev[1].argmax()) == 4 and dev[1, 4] > 2.0
    params = DecisionParams(subspace=True, subspace_threshold=1.0, level_threshold=1e3)
    assert "subspace" in thresholds_of(params) and "subspace" in thresholds_of(DecisionParams())
    assert "subspace" not in thresholds_of(DecisionParams(subspace=False))
    zeros = np.zeros((1, 6), dtype=np.float32)
    one = WindowOutputs(np.zeros(1, np.float32), zeros, zeros, rows[1:2], zeros + 1)
    values = evidence_values(one, cal, params)
    assert values["subspace"][0] == pytest.approx(dev[1].max(), rel=1e-5)
    assert "subspace" not in evidence_values(one, cal, DecisionParams(subspace=False))
    share = sensor_evidence(one, cal, params, values)
    assert int(share.argmax()) == 4


def test_the_store_keeps_the_subspace_and_old_calibrations_load_with_it_off(
    tmp_path: Path,
) -> None:
    cal = _calibration(_levels([50.0, 35.0, 10.0, 3.0, 1.0, 1.0]))
    sensors = tuple(f"s{j}" for j in range(6))
    store = CalibrationStore(tmp_path)
    store.save("1", "pump", sensors, cal, [0.5])
    loaded = store.load("1", "pump", sensors)
    assert loaded is not None
    for name in ("subspace_center", "subspace_basis", "subspace_scale", "level_precision"):
        assert np.array_equal(getattr(loaded[0], name), getattr(cal, name)), name
    path = tmp_path / "1" / "pump.json"
    doc = json.loads(path.read_text())
    for name in ("subspace_center", "subspace_basis", "subspace_scale"):
        del doc[name]  # written before the kind existed
    path.write_text(json.dumps(doc))
    old = store.load("1", "pump", sensors)
    assert old is not None and old[0].subspace_basis is None
    assert old[0].level_center is not None


def test_manifests_without_the_field_keep_the_kind_off() -> None:
    assert Decision.model_fields["subspace"].default is False
    with pytest.raises(Exception, match="subspace_threshold"):
        DecisionParams(subspace_threshold=0.0)


@pytest.mark.parametrize(
    "damage",
    [
        {"subspace_basis": [1.0] * 6},  # 1-D
        {"subspace_basis": [[1.0, 0.0]] * 5},  # 5 rows for 6 sensors
        {"subspace_center": None},  # only part of the subspace
        {"level_center": [0.0] * 5},
        {"input_scale": [1.0] * 5 + [0.0]},  # a zero scale
        {"residual_scale": [1.0] * 5 + [float("nan")]},
        {"level_precision": [[1.0] * 6] * 5},
        {"rows": float("inf")},  # int(inf): OverflowError escaped the load, and the start
        {"seed": [[[[]]]]},
    ],
)
def test_a_damaged_stored_calibration_is_refused_and_redone(
    tmp_path: Path, damage: dict[str, object]
) -> None:
    """A calibration whose arrays do not fit the asset's sensors would fail every window it
    scores; loading it says so and the agent calibrates again."""
    cal = _calibration(_levels([50.0, 35.0, 10.0, 3.0, 1.0, 1.0]))
    sensors = tuple(f"s{j}" for j in range(6))
    store = CalibrationStore(tmp_path)
    store.save("1", "pump", sensors, cal, [0.5])
    path = tmp_path / "1" / "pump.json"
    doc = json.loads(path.read_text())
    doc.update(damage)
    path.write_text(json.dumps(doc))
    assert store.load("1", "pump", sensors) is None, damage
