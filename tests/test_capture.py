"""Window capture on the agent: the wire encoding field by field, the sampler's daily byte
budget and strata, eviction order in the outbox, and sync batches bounded in bytes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cloud.service.records import split_batch
from edge_agent.capture import ALERT, SAMPLE, CaptureSampler, stratum
from edge_agent.config import CapturePolicy
from edge_agent.outbox import ALERT as ALERT_KIND
from edge_agent.outbox import CAPTURE, PREDICTION, Outbox
from edge_agent.sync import MAX_BATCH_BYTES, _fitting
from edge_agent.wire import capture_record
from protos.autoglm.v1 import agent_pb2
from tests.support.captures import T0, window

pytestmark = pytest.mark.unit
DAY = 86_400.0


def batch_of(*bodies: bytes) -> agent_pb2.RecordBatch:
    batch = agent_pb2.RecordBatch()
    for sequence, body in enumerate(bodies, start=1):
        record = batch.records.add()
        record.ParseFromString(body)
        record.sequence = sequence
    return batch


@pytest.mark.parametrize("reason", [ALERT, SAMPLE])
def test_a_capture_crosses_to_the_cloud_unchanged(reason: str) -> None:
    sent = window(reason=reason)
    split = split_batch("device-1", batch_of(capture_record(sent)))
    assert split.rejected == [] and split.predictions == [] and split.alerts == []
    (c,) = split.captures
    assert (c.device_id, c.sequence, c.reason, c.asset, c.model_version) == (
        "device-1",
        1,
        reason,
        "pump-1",
        "7",
    )
    assert c.alert_key == sent.alert_key and c.score == pytest.approx(sent.score)
    assert c.window_start == dt.datetime.fromtimestamp(T0, dt.UTC)
    assert c.window_end == dt.datetime.fromtimestamp(T0 + 23 * 0.5, dt.UTC)
    assert (c.period_s, c.length, c.sensors) == (0.5, 24, ("s0", "s1", "s2", "s3"))
    values, mask = c.arrays()
    np.testing.assert_array_equal(mask, sent.mask)
    present = sent.mask > 0
    np.testing.assert_array_equal(values[present], sent.values[present])
    assert np.isnan(values[~present]).all()  # missing stays missing, never the stale 123
    assert c.input_center == (0.0, 1.0, 2.0, 3.0) and c.input_scale == (0.25,) * 4
    cal = sent.calibration
    assert cal is not None and cal.level_precision is not None and c.calibration is not None
    np.testing.assert_allclose(c.calibration.residual_scale, cal.residual_scale)
    np.testing.assert_allclose(c.calibration.level_center, cal.level_center)
    np.testing.assert_allclose(c.calibration.spread_center, cal.spread_center)
    np.testing.assert_allclose(c.calibration.level_precision, cal.level_precision.reshape(-1))
    assert cal.subspace_basis is not None and cal.subspace_basis.shape == (4, 2)
    np.testing.assert_allclose(c.calibration.subspace_center, cal.subspace_center)
    np.testing.assert_allclose(c.calibration.subspace_basis, cal.subspace_basis.reshape(-1))
    np.testing.assert_allclose(c.calibration.subspace_scale, cal.subspace_scale)


def test_a_capture_from_an_agent_without_the_calibration_still_crosses() -> None:
    split = split_batch("device-1", batch_of(capture_record(window(calibrated=False))))
    assert split.rejected == [] and split.captures[0].calibration is None


def test_a_capture_with_a_misshapen_calibration_is_rejected_naming_it() -> None:
    sent = window()
    assert sent.calibration is not None
    bad = dataclasses.replace(sent.calibration, level_precision=np.eye(3, dtype=np.float32))
    split = split_batch(
        "device-1", batch_of(capture_record(dataclasses.replace(sent, calibration=bad)))
    )
    assert split.captures == [] and len(split.rejected) == 1
    assert "calibration.level_precision: 9 values; 4 sensors take 16" in str(split.rejected[0])


def test_a_capture_without_a_subspace_crosses_with_the_kind_off() -> None:
    """A site without a subspace (too few sensors, or an agent from before it was sent):
    the subspace fields stay empty."""
    sent = window()
    assert sent.calibration is not None
    cal = dataclasses.replace(
        sent.calibration, subspace_center=None, subspace_basis=None, subspace_scale=None
    )
    split = split_batch(
        "device-1", batch_of(capture_record(dataclasses.replace(sent, calibration=cal)))
    )
    assert split.rejected == [] and split.captures[0].calibration is not None
    got = split.captures[0].calibration
    assert (got.subspace_center, got.subspace_basis, got.subspace_scale) == ((), (), ())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"subspace_basis": np.ones((4, 4), np.float32)}, "subspace_basis: 16 values; 4 sensors"),
        ({"subspace_basis": np.ones(6, np.float32)}, "subspace_basis: 6 values; 4 sensors"),
        ({"subspace_scale": None}, "subspace_scale: 0 values; 4 sensors take 4"),
        ({"subspace_center": np.ones(3, np.float32)}, "subspace_center: 3 values"),
        ({"subspace_scale": np.zeros(4, np.float32)}, "subspace_scale[0]: 0.0; every scale"),
        ({"subspace_center": np.ones(257, np.float32)}, "subspace_center: 257 entries > 256"),
        (
            {"subspace_basis": np.ones(256 * 256 + 1, np.float32)},
            "subspace_basis: 65537 entries > 65536",
        ),
        ({"subspace_center": np.full(4, np.inf, np.float32)}, "subspace_center[0]: inf is not"),
        (
            {"level_center": None, "level_scale": None, "level_precision": None,
             "spread_center": None},
            "a subspace without the level fields",
        ),
    ],
)  # fmt: skip
def test_a_capture_with_a_misshapen_subspace_is_rejected_naming_it(
    change: dict[str, object], words: str
) -> None:
    sent = window()
    assert sent.calibration is not None
    bad = dataclasses.replace(sent.calibration, **change)  # type: ignore[arg-type]
    split = split_batch(
        "device-1", batch_of(capture_record(dataclasses.replace(sent, calibration=bad)))
    )
    assert split.captures == [] and len(split.rejected) == 1
    assert words in str(split.rejected[0]), str(split.rejected[0])


def test_a_capture_costs_about_its_values() -> None:
    """T=120, N=8 (the default window of an 8-sensor model): ~4 KB a window, and its site
    calibration (4 N + N*N floats, and the subspace's 2 N + N*k with k = 2: 0.5 KB)."""
    size = len(capture_record(window(t=120, n=8)))
    calibration = (4 * 8 + 8 * 8 + 2 * 8 + 8 * 2) * 4
    assert 120 * 8 * 4 + calibration < size < 120 * 8 * 4 + calibration + 400, size


def policy(**changes: object) -> CapturePolicy:
    base = {
        "max_bytes_per_day": 10_000,
        "sample_share": 0.5,
        "samples_per_day": 60,
        "sample_probability": 1.0,
    }
    return CapturePolicy.model_validate(base | changes)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_alert_windows_are_captured_until_the_days_budget_is_spent(tmp_path: Path) -> None:
    clock = Clock()
    sampler = CaptureSampler(policy(), tmp_path / "capture.json", clock=clock)
    assert sampler.reason_for("pump-1", "pump-1-1", 3.0, T0) == ALERT
    taken = [sampler.admit(ALERT, 3000, 3.0, T0) for _ in range(4)]
    assert taken == [True, True, True, False]  # 9,000 of 10,000 bytes; the 4th is over
    assert sampler.captured == {ALERT: 3, SAMPLE: 0} and sampler.over_budget == 1
    # Windows stamped on other days (clock skew, a replayed backlog) are today's bytes.
    assert not sampler.admit(ALERT, 3000, 3.0, T0 + DAY)
    assert not sampler.admit(ALERT, 3000, 3.0, T0 - DAY)
    clock.now -= DAY  # the device's clock steps back: still today's count
    assert not sampler.admit(ALERT, 3000, 3.0, T0)
    clock.now += 2 * DAY  # the next day of the device's clock: a new budget
    assert sampler.admit(ALERT, 3000, 3.0, T0)


def test_samples_use_only_their_share_and_never_crowd_out_alerts(tmp_path: Path) -> None:
    sampler = CaptureSampler(policy(), tmp_path / "capture.json", clock=Clock())
    scores = [0.1, 0.3, 0.5, 0.7, 0.9]  # one per score band: their own quotas
    admitted = [sampler.admit(SAMPLE, 1000, s, T0) for s in scores * 2]
    assert sum(admitted) == 5  # 5,000 bytes: the samples' half of the budget
    assert sampler.admit(ALERT, 5000, 3.0, T0)  # the other half is still there for alerts


def test_each_stratum_gets_its_quota_a_day(tmp_path: Path) -> None:
    sampler = CaptureSampler(
        policy(max_bytes_per_day=10**9, samples_per_day=60),
        tmp_path / "capture.json",
        clock=Clock(),
    )
    assert sampler.quota == 2  # 60 samples over 6 hour bands x 5 score bands
    low = [sampler.reason_for("pump-1", "", 0.1, T0 + i) for i in range(5)]
    for reason in low:
        if reason:
            sampler.admit(reason, 100, 0.1, T0)
    assert low[:2] == [SAMPLE, SAMPLE]
    assert sampler.reason_for("pump-1", "", 0.1, T0) == ""  # that stratum is full today
    assert sampler.reason_for("pump-1", "", 0.95, T0) == SAMPLE  # a near miss still goes
    assert sampler.reason_for("pump-1", "", 0.1, T0 + 6 * 3600) == SAMPLE  # later hours too
    assert stratum(0.1, T0) != stratum(0.1, T0 + 6 * 3600) != stratum(0.95, T0 + 6 * 3600)


def test_an_open_alert_gives_its_raise_and_then_spaced_windows(tmp_path: Path) -> None:
    sampler = CaptureSampler(
        policy(windows_per_alert=3, alert_spacing=2), tmp_path / "capture.json", clock=Clock()
    )
    first = [sampler.reason_for("pump-1", "k1", 2.0, T0 + i) for i in range(8)]
    assert first == [ALERT, "", ALERT, "", ALERT, "", "", ""]
    other = [sampler.reason_for("pump-2", "k9", 2.0, T0 + i) for i in range(3)]
    assert other == [ALERT, "", ALERT]  # assets apart
    assert sampler.reason_for("pump-1", "k2", 2.0, T0 + 9) == ALERT  # the next alert
    assert sampler.reason_for("pump-1", "", 0.2, T0 + 10) == SAMPLE  # cleared: normal again


def test_sampling_probability_and_turning_it_off(tmp_path: Path) -> None:
    rare = CaptureSampler(
        policy(sample_probability=0.1, max_bytes_per_day=10**9, samples_per_day=10**6),
        tmp_path / "a.json",
        random.Random(1),
        clock=Clock(),
    )
    drawn = sum(bool(rare.reason_for("pump-1", "", 0.2, T0 + i)) for i in range(2000))
    assert 140 < drawn < 260, drawn
    off = CaptureSampler(policy(enabled=False), tmp_path / "b.json", clock=Clock())
    assert off.reason_for("pump-1", "pump-1-1", 5.0, T0) == ""


def test_the_days_counts_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "capture.json"
    first = CaptureSampler(policy(), path, clock=Clock())
    assert first.admit(ALERT, 6000, 2.0, T0)
    again = CaptureSampler(policy(), path, clock=Clock())
    assert not again.admit(ALERT, 6000, 2.0, T0)  # 12,000 > 10,000 today
    path.write_text("{not json")
    assert CaptureSampler(policy(), path, clock=Clock()).admit(
        ALERT, 6000, 2.0, T0
    )  # damaged: starts over


def test_eviction_takes_captures_first_then_predictions_never_alerts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", max_bytes=1 << 16)
    body = b"x" * 1000
    box.append([(ALERT_KIND, body)] * 10 + [(PREDICTION, body)] * 20 + [(CAPTURE, body)] * 20)

    def kinds() -> dict[int, int]:
        rows = box.pending(0, 10_000)
        return {k: sum(1 for _, kind, _ in rows if kind == k) for k in (1, 2, 3)}

    assert kinds() == {PREDICTION: 20, ALERT_KIND: 10, CAPTURE: 20}
    box.append([(ALERT_KIND, body)] * 16)  # 66 KB: over the 64 KiB bound
    # The oldest captures go (as many as the pages the records and their index take need: a
    # few more than their bytes alone, the bound counting their root pages too), nothing else.
    left = kinds()
    assert left[PREDICTION] == 20 and left[ALERT_KIND] == 26 and 4 <= left[CAPTURE] < 20, left
    with sqlite3.connect(box.path) as db:
        pages = db.execute(
            "SELECT COUNT(*) FROM dbstat WHERE name IN ('records', 'records_kind_seq')"
        ).fetchone()[0]
    assert pages * 4096 <= 1 << 16, f"the records take {pages} pages"
    box.append([(ALERT_KIND, body)] * 30)  # every capture goes, then predictions
    left = kinds()
    assert left[CAPTURE] == 0 and left[ALERT_KIND] == 56 and left[PREDICTION] < 20, left
    box.append([(ALERT_KIND, body)] * 20)
    left = kinds()
    assert left[ALERT_KIND] == 76 and left[PREDICTION] == left[CAPTURE] == 0
    assert box.stats().evicted == 20 + 20
    box.close()


def test_a_sync_batch_stays_under_its_byte_bound() -> None:
    big = MAX_BATCH_BYTES // 3
    rows = [(i, CAPTURE, b"x" * big) for i in range(1, 6)]
    assert _fitting(rows) == 3
    assert _fitting([(1, CAPTURE, b"x" * (MAX_BATCH_BYTES + 1))]) == 1  # one always goes
    assert _fitting([(i, PREDICTION, b"x" * 100) for i in range(500)]) == 500


def test_a_record_kind_this_control_plane_does_not_know_is_refused_alone() -> None:
    """What an older control plane does with captures, and this one with a newer kind: the
    record is refused (the agent quarantines it), the rest of the batch is stored."""
    unknown = agent_pb2.Record(sequence=2)
    unknown.MergeFromString(b"\x7a\x03abc")  # field 15, length-delimited: a future kind
    batch = batch_of(capture_record(window()))
    batch.records.append(unknown)
    split = split_batch("device-1", batch)
    assert len(split.captures) == 1
    (rejected,) = split.rejected
    assert rejected.sequence == 2
    assert "carries no prediction, alert event or window capture" in rejected.reason
