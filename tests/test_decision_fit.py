"""The decision fit after a fine-tune (`cloud/model/decision_fit.py`) on hand-made windows:
false alarms pushed under the margin by the least tolerance that does it, verified faults
kept, the infeasible case reported; the per-sensor forecast tolerance it uses; and windows
without a site calibration (older agents) left out and said so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.captures import CaptureLabel
from cloud.model.bundle_writer import read_own_bundle
from cloud.model.capture_data import write_export
from cloud.model.decision_fit import (
    FALSE_ALARM,
    FALSE_ALARM_MARGIN,
    FAULT,
    FAULT_MARGIN,
    NORMAL,
    STEP,
    JudgedBatch,
    fit_tolerances,
    scores_by_group,
    with_network_residuals,
)
from cloud.model.finetune import FinetuneOptions, finetune_bundle
from cloud.service.records import capture_from_proto
from edge_agent.calibration import (
    DecisionParams,
    SiteCalibration,
    WindowOutputs,
    forecast_deviation,
)
from edge_agent.errors import InvalidInput
from tests.support.captures import capture_proto, window
from tests.support.sensordata import SENSORS

pytestmark = pytest.mark.unit
N = 3
PARAMS = DecisionParams(
    prob_threshold=0.5,
    residual_threshold=1.0,
    level_window=8,
    level_threshold=1.0,
    joint_threshold=2.0,
    spread_threshold=1.0,
    supervised=False,
    combine="top2",
    alone=1.15,
)
CAL = SiteCalibration(
    input_center=np.zeros(N, dtype=np.float32),
    input_scale=np.ones(N, dtype=np.float32),
    residual_scale=np.ones(N, dtype=np.float32),
    rows=100,
    level_center=np.zeros(N, dtype=np.float32),
    level_scale=np.ones(N, dtype=np.float32),
    level_precision=np.eye(N, dtype=np.float32),
    spread_center=np.full(N, 0.5, dtype=np.float32),
)


def batch(*windows: tuple[str, list[float], list[float]]) -> JudgedBatch:
    """Windows of (group, level per sensor, forecast residual per sensor); spreads normal."""
    b = len(windows)
    return JudgedBatch(
        CAL,
        WindowOutputs(
            prob=np.zeros(b, dtype=np.float32),
            residual=np.asarray([w[2] for w in windows], dtype=np.float32),
            contribution=np.full((b, N), 1 / N, dtype=np.float32),
            level=np.asarray([w[1] for w in windows], dtype=np.float32),
            spread=np.full((b, N), 0.5, dtype=np.float32),
        ),
        tuple(w[0] for w in windows),
    )


QUIET = [0.1, 0.1, 0.1]


def test_false_alarms_go_under_the_margin_and_faults_stay_detected() -> None:
    # A benign dip of sensor 0 (level 2 calibration spreads) and a fault moving it by 10
    # with sensor 2 (both levels): only sensor 0's level tolerance needs raising.
    judged = [
        batch(
            (FALSE_ALARM, [-2.0, 0.2, 0.0], QUIET),
            (FALSE_ALARM, [-1.6, 0.0, 0.1], QUIET),
            (FAULT, [-10.0, 0.0, 3.0], QUIET),
            (NORMAL, [0.3, -0.2, 0.1], QUIET),
        )
    ]
    fit = fit_tolerances(judged, PARAMS)
    before = scores_by_group(judged, PARAMS)
    after = scores_by_group(judged, fit.decision)
    assert before[FALSE_ALARM].max() >= 1.0 and before[FAULT].min() >= FAULT_MARGIN
    assert after[FALSE_ALARM].max() < FALSE_ALARM_MARGIN, after
    assert after[FAULT].min() >= FAULT_MARGIN, after
    assert fit.false_alarms_left == 0 and fit.faults_missed_before == 0
    level = fit.decision.level_tolerance
    assert level[0] > 1.0 and level[1:] == (1.0, 1.0), fit.decision
    # Kinds not raised stay at their default, (): not written, so older agents load it.
    assert fit.decision.residual_tolerance == () and fit.decision.spread_tolerance == ()
    # As little as needed: one step less and the worst false alarm is back over the margin.
    less = dataclasses.replace(fit.decision, level_tolerance=(level[0] / STEP, 1.0, 1.0))
    assert scores_by_group(judged, less)[FALSE_ALARM].max() >= FALSE_ALARM_MARGIN
    assert fit.before[FALSE_ALARM].alerting == 2 and fit.after[FALSE_ALARM].alerting == 0
    assert "level of sensor 0 1 ->" in fit.note and "0 false-alarm window(s)" in fit.note
    assert fit.as_dict()["level_tolerance"] == list(level)


def test_a_false_alarm_the_forecast_carries_raises_that_sensors_residual_tolerance() -> None:
    judged = [batch((FALSE_ALARM, QUIET, [0.2, 2.5, 0.1]), (FAULT, QUIET, [0.3, 30.0, 0.0]))]
    fit = fit_tolerances(judged, PARAMS)
    assert fit.false_alarms_left == 0
    residual = fit.decision.residual_tolerance
    assert residual[1] > 1.0 and (residual[0], residual[2]) == (1.0, 1.0), fit.decision
    assert scores_by_group(judged, fit.decision)[FAULT].min() >= FAULT_MARGIN


def test_a_false_alarm_the_subspace_carries_raises_that_sensors_subspace_tolerance() -> None:
    # Four sensors moving together along one direction (all four alike); the false alarm
    # leaves it a little on sensors 0 and 1, the fault a lot on sensors 2 and 3. Levels are
    # wide (scale 10), so only the subspace evidence carries either.
    cal = SiteCalibration(
        input_center=np.zeros(4, dtype=np.float32),
        input_scale=np.ones(4, dtype=np.float32),
        residual_scale=np.ones(4, dtype=np.float32),
        rows=100,
        level_center=np.zeros(4, dtype=np.float32),
        level_scale=np.full(4, 10.0, dtype=np.float32),
        level_precision=np.eye(4, dtype=np.float32),
        spread_center=np.full(4, 0.5, dtype=np.float32),
        subspace_center=np.zeros(4, dtype=np.float32),
        subspace_basis=np.full((4, 1), 0.5, dtype=np.float32),
        subspace_scale=np.full(4, 0.25, dtype=np.float32),
    )
    params = dataclasses.replace(PARAMS, subspace=True, subspace_threshold=1.0)
    levels = [[1.0, -0.5, 0.0, 0.0], [0.0, 0.0, 3.0, -3.0]]
    judged = [
        JudgedBatch(
            cal,
            WindowOutputs(
                prob=np.zeros(2, dtype=np.float32),
                residual=np.zeros((2, 4), dtype=np.float32),
                contribution=np.full((2, 4), 0.25, dtype=np.float32),
                level=np.asarray(levels, dtype=np.float32),
                spread=np.full((2, 4), 0.5, dtype=np.float32),
            ),
            (FALSE_ALARM, FAULT),
        )
    ]
    assert scores_by_group(judged, params)[FALSE_ALARM].max() >= 1.0
    fit = fit_tolerances(judged, params)
    assert fit.false_alarms_left == 0, fit.note
    sub = fit.decision.subspace_tolerance
    assert sub[0] > 1.0 and sub[1] > 1.0 and sub[2:] == (1.0, 1.0), fit.decision
    assert fit.decision.level_tolerance == () and fit.decision.residual_tolerance == ()
    assert scores_by_group(judged, fit.decision)[FAULT].min() >= FAULT_MARGIN
    assert "subspace of sensor 0 1 ->" in fit.note
    assert fit.as_dict()["subspace_tolerance"] == list(sub)


def test_when_both_cannot_hold_the_faults_stay_detected_and_the_rest_is_counted() -> None:
    # The fault moves sensor 0 hardly more than the benign dip: quieting the dip would
    # lose it, so the fit keeps the fault and reports the false alarm left.
    judged = [batch((FALSE_ALARM, [-2.0, 0.0, 0.0], QUIET), (FAULT, [-2.4, 0.0, 0.0], QUIET))]
    before = scores_by_group(judged, PARAMS)
    fit = fit_tolerances(judged, PARAMS)
    after = scores_by_group(judged, fit.decision)
    assert after[FAULT].min() >= min(float(before[FAULT].min()), FAULT_MARGIN)
    assert fit.false_alarms_left == 1 and after[FALSE_ALARM].max() >= 1.0
    assert "held where verified faults needed them: level of sensor 0" in fit.note, fit.note
    assert "1 false-alarm window(s) still at or above 1" in fit.note


def test_a_fault_missed_before_the_fit_does_not_block_it() -> None:
    judged = [batch((FALSE_ALARM, [-2.0, 0.0, 0.0], QUIET), (FAULT, [-0.5, 0.0, 0.0], QUIET))]
    fit = fit_tolerances(judged, PARAMS)
    assert fit.false_alarms_left == 0 and fit.faults_missed_before == 1
    assert "1 fault window(s) already under 1 before the fit" in fit.note


def test_nothing_to_fit_leaves_the_decision_as_it_was() -> None:
    quiet = [batch((FALSE_ALARM, [0.2, 0.0, 0.0], QUIET), (FAULT, [-9.0, 0.0, 0.0], QUIET))]
    assert fit_tolerances(quiet, PARAMS).decision == PARAMS
    none = fit_tolerances([], PARAMS)
    assert none.decision == PARAMS and "no judged window with a calibration" in none.note
    levels_off = dataclasses.replace(PARAMS, level_window=0)
    assert "uses no levels" in fit_tolerances(quiet, levels_off).note


def test_residual_scales_follow_the_new_network_on_the_normal_windows() -> None:
    normal = [(NORMAL, QUIET, [1.0, 2.0, 0.5])] * 12
    old = [batch(*normal, (FALSE_ALARM, QUIET, [3.0, 3.0, 3.0]))]
    half = [batch(*[(NORMAL, QUIET, [0.5, 1.0, 1.0])] * 12, (FALSE_ALARM, QUIET, [3.0] * 3))]
    rescaled, note = with_network_residuals(old, half, 0.99)
    assert [b.group[0] for b in rescaled] == [FALSE_ALARM, NORMAL]  # split by group
    for b in rescaled:
        np.testing.assert_allclose(b.calibration.residual_scale, [0.5, 0.5, 2.0])
    assert "from 12 sampled normal windows, by sensor: x0.50 (0.50-0.50), x0.50" in note
    alone = [batch((FALSE_ALARM, QUIET, QUIET))]
    assert with_network_residuals(alone, alone, 0.99)[0] == alone


def test_uncertain_residual_scales_are_read_against_each_group() -> None:
    """Sampled windows disagree on the new network's residuals (one caught a dip's start):
    false alarms are judged under the lowest estimate, faults under the highest."""
    rng = np.random.default_rng(0)
    before = rng.uniform(0.5, 1.5, (12, N))
    after = 0.4 * before
    after[0, 0] = 5.0  # the dip's start: the new network still misses it
    windows = [(FALSE_ALARM, QUIET, [3.0] * N), (FAULT, QUIET, [30.0] * N)]
    old = [batch(*[(NORMAL, QUIET, list(r)) for r in before], *windows)]
    new = [batch(*[(NORMAL, QUIET, list(r)) for r in after], *windows)]
    rescaled, _ = with_network_residuals(old, new, 0.99)
    scale = {b.group[0]: b.calibration.residual_scale for b in rescaled}
    assert scale[FALSE_ALARM][0] <= scale[NORMAL][0] <= scale[FAULT][0]
    assert scale[FALSE_ALARM][0] < scale[FAULT][0]
    np.testing.assert_allclose(scale[FALSE_ALARM][1:], 0.4, rtol=1e-5)


def test_the_residual_tolerance_divides_a_sensors_forecast_deviation() -> None:
    out = batch((FALSE_ALARM, QUIET, [2.0, 2.0, 2.0])).outputs
    tolerant = dataclasses.replace(PARAMS, residual_tolerance=(1.0, 4.0, 1.0))
    np.testing.assert_allclose(forecast_deviation(out, CAL, tolerant)[0], [2.0, 0.5, 2.0])
    with pytest.raises(InvalidInput, match="residual_tolerance"):
        dataclasses.replace(PARAMS, residual_tolerance=(1.0, 0.0, 1.0))


@pytest.mark.slow
def test_fine_tuning_on_windows_without_a_calibration_trains_and_says_the_fit_skipped(
    tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    """Captures from agents that did not send their calibration still fine-tune the network;
    the decision stays the base's and the manifest says why."""
    bundle, key = trained
    captures = []
    for seq in range(1, 5):
        old = window(seed=seq, key=f"k{seq}", calibrated=False)
        old = dataclasses.replace(old, sensors=SENSORS, input_center=np.zeros(4, np.float32))
        record = capture_proto(seq, old)
        captures.append(capture_from_proto("device-1", seq, record.capture, "test"))
    export = tmp_path / "export"
    verdicts = ("false", "false", "true", "false")
    write_export(
        ((c, CaptureLabel("a", v), "edge-1") for c, v in zip(captures, verdicts, strict=True)),
        export,
        {},
    )
    said: list[str] = []
    options = FinetuneOptions(epochs=1, threads=1, version="2")
    manifest = finetune_bundle(export, bundle, tmp_path / "out", options, key, log=said.append)
    decision = manifest.training["decision"]
    assert isinstance(decision, dict)
    assert decision["windows_without_calibration"] == 4, decision
    assert "decision not fitted: no judged window with a calibration" in decision["note"]
    assert any("4 judged window(s) carry no site calibration" in line for line in said), said
    assert manifest.decision == read_own_bundle(bundle, key).decision
