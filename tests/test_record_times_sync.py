"""Times out of range on a device's records, over a real session on SQLite and PostgreSQL: a
record stamped 9999-12-31 (or before 2000) is rejected in the acknowledgement with the field
and the reason (the agent quarantines it), and the rest of its batch is stored. What a real
agent sends is never refused: a backlog weeks old, a clock a few hours ahead."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.autoglm.v1 import agent_pb2
from tests.support.captures import capture_proto
from tests.support.cloud import BACKENDS, RunningPlane, plane_on_backend
from tests.test_hostile_callers import DeviceStream, _device

pytestmark = [pytest.mark.integration]
LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z
DAY = 86_400


@pytest.fixture(params=BACKENDS)
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningPlane]:
    yield from plane_on_backend(request, tmp_path)


def _prediction(sequence: int, start: int, end: int) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=sequence)
    p = record.prediction
    p.asset, p.score, p.model_version = "pump-1", 0.3, "7"
    p.window_start.seconds, p.window_end.seconds = start, end
    return record


def _alert(sequence: int, end: int, raised: int) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=sequence)
    a = record.alert
    a.kind, a.alert_key, a.asset, a.score, a.model_version = (
        agent_pb2.AlertEvent.KIND_RAISED,
        f"k{sequence}",
        "pump-1",
        0.9,
        "7",
    )
    a.window_start.seconds, a.window_end.seconds, a.raised_at.seconds = end - 10, end, raised
    return record


def test_records_stamped_out_of_range_are_rejected_and_the_rest_stored(
    plane: RunningPlane, tmp_path: Path
) -> None:
    now = int(time.time())
    stream = DeviceStream.accepted(plane, _device(plane, tmp_path, "edge"))
    records = [
        _prediction(1, now - 20, now - 10),
        _prediction(2, now - 20, LAST_SECOND),  # the fast path's check
        _alert(3, now - 5, LAST_SECOND),
        _prediction(4, 0, now),  # 1970: an unset clock
        _prediction(5, now - 60 * DAY, now - 60 * DAY + 10),  # a backlog two months old
        _prediction(6, now + 3 * 3600, now + 3 * 3600 + 10),  # a clock hours ahead
        _alert(7, now - 30 * DAY, now - 30 * DAY),
        capture_proto(8),  # its window in 2026-09
    ]
    stream.send(agent_pb2.AgentMessage(records=agent_pb2.RecordBatch(records=records)))
    ack = stream.next("batch_ack").batch_ack
    stream.close()
    rejected = {r.sequence: r.reason for r in ack.rejected}
    assert sorted(rejected) == [2, 3, 4], ack
    assert rejected[2].startswith("records[1] (sequence 2).prediction.window_end: 9999-12-31")
    assert "more than a day after the batch arrived" in rejected[2], rejected[2]
    assert rejected[3].startswith("records[2] (sequence 3).alert.raised_at: 9999-12-31")
    assert "before 2000-01-01" in rejected[4], rejected[4]
    assert (ack.up_to_sequence, ack.stored) == (8, 5), ack
    store = plane.plane.store
    device_id = store.list_alert_events()[0].device_id
    stored = [p.sequence for p in store.list_predictions(device_id)]
    assert sorted(stored) == [1, 5, 6], stored
    assert [e.sequence for e in store.list_alert_events(device_id)] == [7]
