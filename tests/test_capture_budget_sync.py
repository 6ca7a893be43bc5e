"""A device streaming captures past its daily budget, over a real session on SQLite and
PostgreSQL: each capture past it is refused in the acknowledgement with the reason (the agent
quarantines it rather than resending it), the predictions and the captures within it are
stored, and nothing past it reaches the database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud import capture_budget
from cloud.capture_budget import CaptureBudget
from cloud.captures import CaptureFilter
from protos.autoglm.v1 import agent_pb2
from tests.support.captures import T0, capture_proto
from tests.support.cloud import BACKENDS, RunningPlane, plane_on_backend
from tests.test_hostile_callers import DeviceStream, _device

pytestmark = [pytest.mark.integration]


@pytest.fixture(params=BACKENDS)
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningPlane]:
    yield from plane_on_backend(request, tmp_path)


def _prediction(sequence: int) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=sequence)
    p = record.prediction
    p.asset, p.score, p.model_version = "pump-1", 0.3, "7"
    p.window_start.seconds, p.window_end.seconds = int(T0), int(T0) + 10
    return record


def test_captures_past_the_day_budget_are_refused_in_the_ack(
    plane: RunningPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_budget, "DAY_BUDGET", CaptureBudget(captures=3, bytes=1 << 30))
    identity = _device(plane, tmp_path, "edge")
    stream = DeviceStream.accepted(plane, identity)
    refused: dict[int, str] = {}
    stored = 0
    for first in (1, 11, 21):  # three batches: a prediction and four captures each
        records = [_prediction(first), *(capture_proto(first + k) for k in range(1, 5))]
        stream.send(agent_pb2.AgentMessage(records=agent_pb2.RecordBatch(records=records)))
        ack = stream.next("batch_ack").batch_ack
        assert ack.up_to_sequence == first + 4, ack
        refused.update({r.sequence: r.reason for r in ack.rejected})
        stored += ack.stored
    assert sorted(refused) == [5, 12, 13, 14, 15, 22, 23, 24, 25], refused
    assert all("over this device's capture budget" in r for r in refused.values()), refused
    assert stored == 3 + 3, stored  # three predictions, three captures
    stream.close()
    kept = plane.plane.store.list_captures(CaptureFilter(dt.datetime.fromtimestamp(T0, dt.UTC)))
    assert [c.sequence for c in kept] == [2, 3, 4]
