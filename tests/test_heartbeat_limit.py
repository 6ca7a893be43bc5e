"""A session sending heartbeats far faster than its agent would, over real mutual TLS: past a
burst and about one a second the extras are dropped before they are checked or stored (an
out-of-bounds status among them does not end the session, nor reach the device's record),
unanswered, counted, and logged once; the session goes on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cloud.service.heartbeat_limit import HEARTBEAT_BURST
from protos.autoglm.v1 import agent_pb2
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _prediction

pytestmark = pytest.mark.integration
EXTRA = 40


def _heartbeat(seq: int, model_version: str) -> agent_pb2.AgentMessage:
    status = agent_pb2.AgentStatus(model_version=model_version)
    return agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq, status=status))


def test_heartbeats_past_the_allowance_are_dropped_unchecked_and_the_session_goes_on(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plane.plane.heartbeat_limit.clock = lambda: 100.0  # no time passes: nothing refills
    identity = _device(plane, tmp_path, "chatty")
    stream = DeviceStream.accepted(plane, identity)
    caplog.set_level(logging.WARNING)
    for seq in range(1, HEARTBEAT_BURST + 1):
        stream.send(_heartbeat(seq, "kept"))
    for seq in range(HEARTBEAT_BURST + 1, HEARTBEAT_BURST + EXTRA + 1):
        # Out of bounds (64 characters at most): checked, it would end the session.
        stream.send(_heartbeat(seq, "x" * 1000))
    # Read in order after them: every heartbeat answered is answered before its ack.
    stream.send(agent_pb2.AgentMessage(records=agent_pb2.RecordBatch(records=[_prediction(1)])))
    acked = []
    while (item := stream.inbound.get(timeout=30)) is not None:
        assert isinstance(item, agent_pb2.ControlMessage), f"the session ended: {item}"
        if item.WhichOneof("body") == "batch_ack":
            break
        if item.WhichOneof("body") == "heartbeat_ack":
            acked.append(item.heartbeat_ack.seq)
    assert acked == list(range(1, HEARTBEAT_BURST + 1)), acked
    dropped = plane.plane.metrics.registry.get_sample_value("autoglm_heartbeats_dropped_total")
    assert dropped == EXTRA, dropped
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("heartbeat_limit")]
    assert len(lines) == 1 and "dropped unread" in lines[0], lines
    stream.close()
    plane.flush_presence()
    with plane.client() as client:
        assert client.get_device("chatty").status.model_version == "kept"
