"""Captured windows at the control plane, on SQLite and PostgreSQL: hostile captures from a
device are refused by name without losing what is stored, captures are stored once, and the
operator API lists them in bounded pages with their verdicts, to viewers too, refusing bad
requests with errors that say what is wrong."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud.captures import MAX_CELLS
from cloud.domain import AlertEventRecord
from edge_agent.capture import SAMPLE
from edge_agent.errors import InvalidInput, NotFound, PermissionDenied
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.support.captures import T0, capture_proto, window
from tests.support.cloud import BACKENDS, RunningPlane, plane_on_backend
from tests.test_hostile_callers import DeviceStream, _device

pytestmark = [pytest.mark.integration]


@pytest.fixture(params=BACKENDS)
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningPlane]:
    yield from plane_on_backend(request, tmp_path)


def hostile_batch() -> tuple[agent_pb2.RecordBatch, dict[int, str]]:
    """Good captures 1 and 12, and between them one hostile capture per way to be wrong,
    with the words its refusal must say."""
    oversized = capture_proto(2, window(t=4096, n=17))
    nan = capture_proto(3)
    values = np.frombuffer(nan.capture.values, dtype="<f4").copy()
    values[5] = math.nan
    nan.capture.values = values.tobytes()
    short = capture_proto(4)
    short.capture.values = short.capture.values[:-4]
    mask = capture_proto(5)
    mask.capture.mask = mask.capture.mask + b"\x00"
    rows = capture_proto(6)
    rows.capture.length = 23  # values for 24 rows
    center = capture_proto(7)
    del center.capture.input_center[-1]
    scale = capture_proto(8)
    scale.capture.input_scale[0] = 0.0
    keyless = capture_proto(9)
    keyless.capture.alert_key = ""
    slow = capture_proto(10)
    slow.capture.period_seconds = 1e12  # its window would end past any calendar
    late = capture_proto(11)
    late.capture.window_start.seconds = 253_402_300_799 - 5  # 5 s before the year 10000
    records = [capture_proto(1), oversized, nan, short, mask, rows, center, scale, keyless]
    batch = agent_pb2.RecordBatch(records=[*records, slow, late, capture_proto(12)])
    expected = {
        2: f"values > {MAX_CELLS}",
        3: "row 1, sensor 's1' is nan (not a finite number",
        4: "capture.values: 380 bytes; a 24 x 4 window of float32 takes 384",
        5: "capture.mask: 13 bytes; 96 bits take 12",
        6: "capture.values: 384 bytes; a 23 x 4 window of float32 takes 368",
        7: "capture.input_center: 3 values for 4 sensors",
        8: "capture.input_scale: every scale must be positive",
        9: "capture.alert_key: an alert window without its alert key",
        10: "capture.period_seconds: 1000000000000.0; more than 0 and at most 86400",
        11: "capture.window_start: its window ends past the year 9999",
    }
    return batch, expected


def test_hostile_captures_are_refused_by_name_and_stored_ones_stay(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = _device(plane, tmp_path, "edge")
    device_id = identity.info.device_id
    stream = DeviceStream.accepted(plane, identity)
    batch, expected = hostile_batch()
    stream.send(agent_pb2.AgentMessage(records=batch))
    ack = stream.next("batch_ack").batch_ack
    assert (ack.up_to_sequence, ack.stored, ack.duplicates) == (12, 2, 0), ack
    reasons = {r.sequence: r.reason for r in ack.rejected}
    assert sorted(reasons) == sorted(expected), reasons
    for sequence, words in expected.items():
        assert words in reasons[sequence], (sequence, reasons[sequence])
    # Resent (a reconnect): stored once, counted as duplicates; what is stored is unchanged.
    stream.send(agent_pb2.AgentMessage(records=agent_pb2.RecordBatch(records=[batch.records[0]])))
    again = stream.next("batch_ack").batch_ack
    assert (again.stored, again.duplicates) == (0, 1), again
    stream.close()
    store = plane.plane.store
    since = dt.datetime.fromtimestamp(T0, dt.UTC)
    from cloud.captures import CaptureFilter

    stored = store.list_captures(CaptureFilter(since))
    assert [(c.device_id, c.sequence) for c in stored] == [(device_id, 1), (device_id, 12)]
    values, mask = stored[0].arrays()
    sent = window(seed=1)
    np.testing.assert_array_equal(mask, sent.mask)
    np.testing.assert_array_equal(values[mask > 0], sent.values[sent.mask > 0])


def _seed(plane: RunningPlane, tmp_path: Path) -> str:
    """Device `edge` (site=a) with four captures: alert windows of keys k1 and k2 (their
    raises stored first), and two samples; another device `other` (site=b) with one."""
    store = plane.plane.store
    device_id = _device(plane, tmp_path, "edge").info.device_id
    other = _device(plane, tmp_path, "other").info.device_id
    store.update_labels(other, {"site": "b"}, [])
    end = dt.datetime.fromtimestamp(T0 + 11.5, dt.UTC)
    events = [
        AlertEventRecord(
            device_id=device_id,
            sequence=seq,
            alert_key=key,
            kind="raised",
            asset=asset,
            fault="anomaly",
            score=2.5,
            top_sensors=[("s0", 0.5)],
            window_start=end - dt.timedelta(seconds=11.5),
            window_end=end,
            raised_at=end,
            model_version="7",
        )
        for seq, key, asset in ((1, "k1", "pump-1"), (3, "k2", "pump-2"))
    ]
    from cloud.service.records import capture_from_proto

    def capture(device: str, sequence: int, captured: object) -> object:
        record = capture_proto(sequence, captured)  # type: ignore[arg-type]
        return capture_from_proto(device, sequence, record.capture, "test")

    captures = [
        capture(device_id, 2, window(key="k1")),
        capture(device_id, 4, window(key="k2")),
        capture(device_id, 5, window(reason=SAMPLE, seed=5)),
        capture(device_id, 6, window(reason=SAMPLE, seed=6, calibrated=False)),  # an older agent
    ]
    now = dt.datetime.now(dt.UTC)
    store.store_records(device_id, [], events, now, captures=captures)  # type: ignore[arg-type]
    store.store_records(other, [], [], now, captures=[capture(other, 1, window(reason=SAMPLE))])  # type: ignore[list-item]
    return device_id


def _request(**fields: object) -> operator_pb2.ListCapturesRequest:
    request = operator_pb2.ListCapturesRequest(**fields)  # type: ignore[arg-type]
    request.since.FromDatetime(dt.datetime.fromtimestamp(T0, dt.UTC))
    return request


def test_captures_are_listed_in_pages_with_their_verdicts(
    plane: RunningPlane, tmp_path: Path
) -> None:
    _seed(plane, tmp_path)
    with plane.client() as client:
        alerts = {a.asset: a for a in client.list_alerts(operator_pb2.ListAlertsRequest())}
        client.alert_action("ack", alerts["pump-1"].id, verdict="false")
        viewer = client.add_operator("vera", "viewer").token
    with plane.client(viewer) as client:  # a viewer may read retraining data
        every = list(client.list_captures(_request(page_size=1)))
        # Pages of one: every window once (ordered by device id, then sequence).
        assert sorted((w.device_name, w.sequence) for w in every) == [
            ("edge", 2),
            ("edge", 4),
            ("edge", 5),
            ("edge", 6),
            ("other", 1),
        ]
        by_seq = {(w.device_name, w.sequence): w for w in every}
        assert by_seq[("edge", 2)].verdict == "false"
        assert by_seq[("edge", 2)].alert_id == alerts["pump-1"].id
        assert by_seq[("edge", 4)].verdict == "" and by_seq[("edge", 4)].alert_id
        assert by_seq[("edge", 5)].alert_id == ""  # a sample belongs to no alert
        # The whole site calibration is kept with the window; an older agent's has none.
        sent = window(key="k1").calibration
        assert sent is not None and sent.level_precision is not None
        kept = by_seq[("edge", 2)].capture.calibration
        np.testing.assert_allclose(kept.level_precision, sent.level_precision.reshape(-1))
        np.testing.assert_allclose(kept.residual_scale, sent.residual_scale)
        assert not by_seq[("edge", 6)].capture.HasField("calibration")
        falses = list(client.list_captures(_request(verdict="false")))
        assert [w.sequence for w in falses] == [2]
        pending = list(client.list_captures(_request(verdict="none", device="edge")))
        assert sorted(w.sequence for w in pending) == [4, 5, 6]
        site_b = list(client.list_captures(_request(selector="site=b")))
        assert [(w.device_name, w.sequence) for w in site_b] == [("other", 1)]
        later = _request()
        later.since.FromDatetime(dt.datetime.fromtimestamp(T0 + 60, dt.UTC))
        assert list(client.list_captures(later)) == []
        with pytest.raises(PermissionDenied):  # still a viewer: no verdicts
            client.alert_action("ack", alerts["pump-2"].id, verdict="true")


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [
        (operator_pb2.ListCapturesRequest(), InvalidInput, "since: required"),
        (_request(page_size=5000), InvalidInput, "page_size: 5000 > 1000"),
        (_request(verdict="maybe"), InvalidInput, "verdict: 'maybe' is not one of"),
        (_request(device="nope"), NotFound, "nope"),
        (_request(selector="site in (a"), InvalidInput, "site in (a"),
        (_request(device="d" * 200), InvalidInput, "device: 200 characters > 128"),
    ],
)
def test_bad_listing_requests_say_what_is_wrong(
    plane: RunningPlane,
    tmp_path: Path,
    request_: operator_pb2.ListCapturesRequest,
    error: type[Exception],
    words: str,
) -> None:
    with plane.client() as client, pytest.raises(error) as caught:
        list(client.list_captures(request_))
    assert words in str(caught.value), str(caught.value)


def test_pulling_a_model_that_was_never_pushed_is_not_found(
    plane: RunningPlane, tmp_path: Path
) -> None:
    with plane.client() as client, pytest.raises(NotFound, match="pump"):
        client.pull_bundle("pump", "9", tmp_path / "base")


def test_pages_of_large_windows_are_split_by_bytes(
    plane: RunningPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud.service import operator_captures

    _seed(plane, tmp_path)
    one = 0
    with plane.client() as client:
        one = next(iter(client.list_captures(_request(page_size=1)))).ByteSize()
        # Room for about two windows a message: a page of five comes as three or more.
        monkeypatch.setattr(operator_captures, "MAX_MESSAGE_BYTES", 2 * one + 10)
        messages = list(
            client._stub.ListCaptures(_request(page_size=1000), metadata=client._metadata)
        )
    sizes = [(len(m.windows), m.ByteSize()) for m in messages]
    assert sum(n for n, _ in sizes) == 5 and len(sizes) >= 3, sizes
    cap = 2 * one + 10
    assert all(n == 1 or size <= cap + 16 for n, size in sizes), (cap, sizes)
