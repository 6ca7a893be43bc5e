"""The unseen-fault protocol on a small scale: a model trained without any labels of a fault
kind still catches it and injected faults, within its false-alarm budget; training is
deterministic; thresholds come from held-out normal data only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import evaluate, load_model
from cloud.model.faults import KINDS, Stretch, inject
from cloud.model.metrics import Counts
from cloud.model.pipeline import train_bundle
from cloud.model.protocol import (
    normal_stretches,
    other_sites_far,
    prefix_stretches,
    score_injected,
    unseen_kind,
)
from cloud.model.train import TrainParams
from edge_agent.calibration import DecisionParams
from edge_agent.errors import InvalidInput
from tests.support.bundles import small_options
from tests.support.sensordata import SENSORS, write_dataset, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OPTIONS = small_options("pump-unseen", epochs=4, seed=11)


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_dataset(tmp_path_factory.mktemp("data"), experiments=4, normal=4)
    for i in range(4):  # a fault kind with no labels in training: only its first K rows
        write_experiment(root / "unseen" / f"{i}.csv", seed=40 + i, rows=420, fault=(240, 360))
    return root


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, data: Path, key: ed25519.Ed25519PrivateKey
) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "b"
    options = dataclasses.replace(OPTIONS, context_only=(data / "unseen",))
    train_bundle([data], out, options, key, log=lambda _: None)
    return out


def test_an_unseen_kind_is_caught_within_the_budget(
    bundle: Path, data: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    thresholds = manifest["training"]["thresholds"]
    assert thresholds["episodes"] >= 2 and thresholds["held_out_far"] <= 0.1, thresholds
    files, total = unseen_kind(bundle, data / "unseen", key.public_key(), 120)
    assert len(files) == 4
    assert total.mar < 0.5, total.summary()
    assert total.far < 0.25, total.summary()


def test_injected_faults_are_detected_and_clean_stretches_stay_quiet(
    bundle: Path, data: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    with load_model(bundle, key.public_key()) as loaded:
        stretches = normal_stretches([data / "normal.csv"], list(SENSORS), 120, 240)
        assert stretches
        results = {
            r.kind: r.counts
            for r in score_injected(loaded, stretches, [1, 2], ("none", "step", "leak"))
        }
    assert results["none"].tp + results["none"].fn == 0  # nothing injected, nothing to find
    assert results["none"].far < 0.15, results["none"].summary()
    for kind in ("step", "leak"):
        assert results[kind].mar < 0.6, (kind, results[kind].summary())


def test_other_sites_are_cut_before_their_fault_and_count_only_false_alarms(
    bundle: Path, data: Path, key: ed25519.Ed25519PrivateKey, tmp_path: Path
) -> None:
    """`prefix_stretches`: each labelled file's rows before its first fault, once per
    calibration length with enough rows left to score; `other_sites_far` scores them as the
    background alone, so every flag is a false alarm."""
    files = sorted((data / "faults").glob("*.csv"))  # fault at rows 200-300 of 360
    stretches = prefix_stretches(files, list(SENSORS), [130, 160, 170], min_scored=40)
    # 200 - 160 = 40 rows: just enough; 200 - 170 = 30: too few
    assert len(stretches) == 2 * len(files)
    assert {s.values.shape[0] for s in stretches} == {200}
    assert {s.calibration_rows for s in stretches} == {130, 160}
    assert all(s.name.startswith("faults/") for s in stretches), [s.name for s in stretches]
    with load_model(bundle, key.public_key()) as loaded:
        per = other_sites_far(loaded, stretches)
        whole = score_injected(loaded, stretches, [0], ("none",))[0].counts
    total = sum((c for _, c in per), Counts())
    assert total == whole  # the same scoring, stretch by stretch
    for name, counts in per:
        assert counts.tp + counts.fn == 0, name
        assert counts.fp + counts.tn == 200 - int(name.rsplit("@", 1)[1]), name
    unlabelled = prefix_stretches([data / "normal.csv"], list(SENSORS), [120])
    assert [s.values.shape[0] for s in unlabelled] == [360 * 4]  # no fault: every row
    # a fault from the first row leaves nothing; two files of one name stay apart
    for folder in ("a", "b"):
        write_experiment(tmp_path / folder / "0.csv", seed=7, rows=300, fault=(0, 100))
    assert prefix_stretches([tmp_path / "a" / "0.csv"], list(SENSORS), [120]) == []
    for folder in ("a", "b"):
        write_experiment(tmp_path / folder / "1.csv", seed=8, rows=300, fault=(250, 280))
    twins = prefix_stretches(
        [tmp_path / "a" / "1.csv", tmp_path / "b" / "1.csv"], list(SENSORS), [120]
    )
    assert [s.name for s in twins] == ["a/1.csv[0:250]@120", "b/1.csv[0:250]@120"]


def test_training_is_deterministic_with_a_seed(
    tmp_path: Path, data: Path, bundle: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    again = tmp_path / "again"
    options = dataclasses.replace(OPTIONS, context_only=(data / "unseen",))
    train_bundle([data], again, options, key, log=lambda _: None)
    first = json.loads((bundle / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["decision"] == second["decision"]
    assert first["training"]["losses"] == second["training"]["losses"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_injected_kind_changes_only_the_fault_rows(kind: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(300, 4)).cumsum(axis=0).astype(np.float32)
    base[:, 1] = base[:, 0] + 0.1 * rng.normal(size=300)  # a correlated pair
    stretch = Stretch("s", base, 100)
    faulty = inject(stretch, kind, SENSORS, np.random.default_rng(5))
    assert faulty.labels.sum() >= 2 and not faulty.labels[:100].any()
    changed = ~np.isclose(faulty.values, base).all(axis=1)
    assert changed.any(), kind
    assert not changed[~faulty.labels].any(), kind


def test_thresholds_never_depend_on_fault_rows() -> None:
    """Fitting sees only normal windows: changing what the fault rows hold changes nothing."""
    from cloud.model.thresholds import EpisodeEvidence, fit_thresholds

    rng = np.random.default_rng(0)
    normal = np.ones(400, dtype=bool)
    normal[100:200] = False
    kinds = ("level", "joint", "spread", "forecast")
    values = {k: rng.gamma(2.0, 1.0, 400).astype(np.float32) for k in kinds}
    base = DecisionParams(level_window=8, supervised=False, smoothing=1, subspace=False)
    first = fit_thresholds([EpisodeEvidence("e", values, normal)], base)
    louder = {k: v.copy() for k, v in values.items()}
    for v in louder.values():
        v[100:200] *= 50
    second = fit_thresholds([EpisodeEvidence("e", louder, normal)], base)
    assert first.decision == second.decision
    assert first.far <= base.target_far + 1e-9, first.summary()


def test_the_spread_threshold_never_falls_below_its_floor() -> None:
    """Spread that barely moves on normal data still needs a large log ratio to alarm (a
    stuck sensor), so its normal wobble does not raise every other kind's threshold."""
    from cloud.model.thresholds import MIN_SPREAD, EpisodeEvidence, fit_thresholds

    rng = np.random.default_rng(1)
    normal = np.ones(400, dtype=bool)
    values = {k: rng.gamma(2.0, 1.0, 400).astype(np.float32) for k in ("level", "joint")}
    values["forecast"] = rng.gamma(2.0, 1.0, 400).astype(np.float32)
    values["spread"] = rng.gamma(2.0, 0.05, 400).astype(np.float32)
    base = DecisionParams(level_window=8, supervised=False, smoothing=1, subspace=False)
    fitted = fit_thresholds([EpisodeEvidence("e", values, normal)], base)
    assert fitted.decision.spread_threshold == MIN_SPREAD
    assert fitted.far <= base.target_far + 1e-9, fitted.summary()
    assert fitted.far_by_kind["spread"] == 0.0


def test_other_machines_minute_data_and_a_constant_sensor(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    """Two live sensors sampled once a minute plus one that never changes: the constant one is
    left out with a note, the period is inferred, and the rest trains and scores as usual."""
    rng = np.random.default_rng(4)
    for i in range(3):
        rows = 400
        t = np.arange(rows)
        a = np.sin(2 * np.pi * t / 50 + i) + 0.1 * rng.standard_normal(rows)
        b = 0.5 * a + 0.05 * rng.standard_normal(rows)
        lines = ["timestamp,temp,pressure,setpoint"] + [
            f"{1_700_000_000 + 60 * r},{a[r]:.4f},{b[r]:.4f},42" for r in range(rows)
        ]
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"m{i}.csv").write_text("\n".join(lines) + "\n")
    notes: list[str] = []
    options = dataclasses.replace(OPTIONS, name="minute", train=TrainParams(epochs=2, seed=1))
    manifest = train_bundle([tmp_path / "data"], tmp_path / "b", options, key, log=notes.append)
    assert [s.name for s in manifest.sensors] == ["temp", "pressure"]
    assert manifest.sampling.period_s == 60.0
    assert manifest.training["dropped_constant_sensors"] == ["setpoint"]
    assert any("setpoint" in n and "left out" in n for n in notes), notes
    assert manifest.decision.level_tolerance and len(manifest.decision.level_tolerance) == 2


def test_one_kind_alone_needs_a_margin_two_kinds_together_do_not() -> None:
    """`top2` with `alone`: the mean of the two strongest kinds reaches 1 with both at their
    thresholds; one kind alone only at `alone` times its threshold; `alone` 0: never alone.
    A manifest written before `alone` keeps its old meaning (0)."""
    from edge_agent.bundle import Decision
    from edge_agent.calibration import combine

    def score(values: list[float], rule: str, alone: float) -> float:
        return float(combine([np.asarray([v], dtype=np.float32) for v in values], rule, alone)[0])

    assert score([1.0, 1.0, 0.0], "top2", 1.15) == pytest.approx(1.0)
    assert score([1.1, 0.0, 0.0], "top2", 1.15) < 1.0
    assert score([1.2, 0.0, 0.0], "top2", 1.15) >= 1.0
    assert score([1.9, 0.0, 0.0], "top2", 0.0) < 1.0  # never alone
    assert score([1.1, 0.0, 0.0], "max", 1.15) >= 1.0  # `max` ignores it
    assert score([1.1], "top2", 1.15) >= 1.0  # a single kind of evidence is all there is
    assert Decision.model_fields["alone"].default == 0.0
    with pytest.raises(Exception, match="alone"):
        DecisionParams(alone=0.5)


def test_a_forecast_residual_counts_only_for_a_sensor_not_coming_back_to_normal() -> None:
    """`forecast_away`: a sensor whose recent level is closer to the site's normal than its
    level before (the end of a fault) gives no forecast evidence; one leaving normal, or one
    without readings before, does. A manifest written before it keeps its old meaning."""
    from edge_agent.bundle import Decision
    from edge_agent.calibration import (
        SiteCalibration,
        WindowOutputs,
        earlier_level,
        forecast_deviation,
    )

    ones = np.ones(3, dtype=np.float32)
    cal = SiteCalibration(ones * 0, ones, ones, 100, level_center=np.zeros(3, dtype=np.float32))
    level = np.asarray([[0.5, 3.0, 0.5]], dtype=np.float32)
    before = np.asarray([[3.0, 0.5, np.nan]], dtype=np.float32)
    residual = np.full((1, 3), 2.0, dtype=np.float32)
    out = WindowOutputs(ones[:1], residual, residual, level, level, before)
    gated = forecast_deviation(out, cal, DecisionParams())
    assert gated.tolist() == [[0.0, 2.0, 2.0]]
    assert forecast_deviation(out, cal, DecisionParams(forecast_away=False)).tolist() == [[2.0] * 3]
    window = np.zeros((1, 10, 3), dtype=np.float32)
    window[0, :4] = 1.0  # the 6 rows before the last 3 are rows 1-6: three of them are 1
    mask = np.ones_like(window)
    mask[0, :, 2] = 0.0
    earlier = earlier_level(window, mask, np.zeros(3, np.float32), np.ones(3, np.float32), 3)
    assert earlier[0, 0] == pytest.approx(0.5) and np.isnan(earlier[0, 2])
    assert Decision.model_fields["forecast_away"].default is False


def _write_units(root: Path, units: int, seed: int) -> Path:
    """Run-to-failure units counted in cycles (no clock): 14 sensors, 2 of them constant set
    points, a slow quadratic degradation on 6 sensors over each unit's last 40 %, the last
    20 % labelled faulty, units of 128 to 250 cycles (the length of turbofan-style units)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for u in range(units):
        rows = 128 if u == 0 else 150 + 20 * u  # the first: calibrates on one window alone
        t = np.arange(rows)
        wear = np.clip((t - 0.6 * rows) / (0.4 * rows), 0, None) ** 2
        columns = {"setpoint_a": np.full(rows, 100.0), "setpoint_b": np.full(rows, 0.84)}
        for s in range(12):
            sign = 1 if s % 2 else -1
            columns[f"s{s}"] = 50 + s + rng.normal(0, 1, rows) + (6 * sign * wear if s < 6 else 0)
        label = (t >= 0.8 * rows).astype(int)
        lines = ["cycle," + ",".join(columns) + ",anomaly"] + [
            f"{r + 1}," + ",".join(f"{v[r]:.3f}" for v in columns.values()) + f",{label[r]}"
            for r in range(rows)
        ]
        (root / f"unit{u}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_run_to_failure_units_in_cycles_train_and_score_with_defaults(
    tmp_path: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    """Another kind of machine: cycles instead of a clock, short units, constant set points.
    With the default window left to the data, every unit calibrates on full windows (a
    120-row window left most units without one: training refused), and the slow wear is
    caught within the false-alarm bound."""
    data = _write_units(tmp_path / "train", units=6, seed=1)
    notes: list[str] = []
    options = dataclasses.replace(
        OPTIONS,
        name="turbofan",
        window=0,
        segments=8,
        calibration_rows=400,
        train=TrainParams(epochs=4, seed=2),
    )
    manifest = train_bundle([data], tmp_path / "b", options, key, log=notes.append)
    assert manifest.window.length == 64, notes
    assert any("window 64" in n for n in notes), notes
    assert manifest.sampling.period_s == 1.0
    assert manifest.training["dropped_constant_sensors"] == ["setpoint_a", "setpoint_b"]
    test_units = _write_units(tmp_path / "test", units=4, seed=9)
    with load_model(tmp_path / "b", key.public_key()) as loaded:
        _, total = evaluate(loaded, test_units, 100)
        with pytest.raises(InvalidInput, match="at least 65 rows"):
            evaluate(loaded, test_units, 60)
    assert total.far <= 0.15 and total.mar <= 0.6, total.summary()
