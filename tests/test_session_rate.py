"""A device that opens sessions one after another, closing each first (never a replacement,
so never counted as flapping), over real mutual TLS: past SESSIONS_PER_WINDOW a minute it is
refused with RESOURCE_EXHAUSTED and a retry hint, with no claim written and no line logged
per attempt; its agent reads the refusal as not the plane's load and waits as told; other
devices are served."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from cloud.service.session_rate import SESSION_WINDOW_S, SESSIONS_PER_WINDOW
from edge_agent.errors import RETRY_AFTER_KEY, RateLimited, from_rpc_error
from edge_agent.session_end import SessionEnd, classify
from protos.autoglm.v1 import agent_pb2_grpc
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import _device, _hello

pytestmark = pytest.mark.integration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(plane: RunningPlane, channel: grpc.Channel) -> grpc.RpcError | None:
    """Opens a session, says hello and closes it; the error it ended with, if any."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        list(stub.Session(iter([_hello()]), timeout=30))
    except grpc.RpcError as exc:
        return exc
    return None


def test_a_device_opening_sessions_too_often_is_refused_cheaply_with_a_hint(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    plane.plane.session_rate.clock = clock
    looping, good = _device(plane, tmp_path, "looping"), _device(plane, tmp_path, "good")
    store = plane.plane.store
    caplog.set_level(logging.INFO)
    with grpc.secure_channel(plane.device_address, looping.credentials()) as channel:
        opened = [_session(plane, channel) for _ in range(SESSIONS_PER_WINDOW)]
        assert opened == [None] * SESSIONS_PER_WINDOW, opened
        caplog.clear()
        refused = [_session(plane, channel) for _ in range(30)]
    codes = [e.code() if e is not None else grpc.StatusCode.OK for e in refused]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 30, codes
    first = refused[0]
    assert first is not None
    assert any(k == RETRY_AFTER_KEY for k, _ in first.trailing_metadata() or ())
    error = from_rpc_error(first, plane.device_address)
    assert isinstance(error, RateLimited), error
    assert error.retry_after_s == pytest.approx(SESSION_WINDOW_S), error
    # The agent honours any RateLimited's hint; it must not count this as the plane's load.
    assert classify(error) is SessionEnd.OTHER, error
    # No claim written for the refused ones, one line logged for all 30.
    generation = store.newest_sessions([looping.info.device_id])[looping.info.device_id][0]
    assert generation == SESSIONS_PER_WINDOW
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and "too often" in lines[0], lines
    # Another device is served meanwhile; the looping one again once the window has passed.
    with grpc.secure_channel(plane.device_address, good.credentials()) as channel:
        assert _session(plane, channel) is None
    clock.now += SESSION_WINDOW_S
    with grpc.secure_channel(plane.device_address, looping.credentials()) as channel:
        assert _session(plane, channel) is None
    generation = store.newest_sessions([looping.info.device_id])[looping.info.device_id][0]
    assert generation == SESSIONS_PER_WINDOW + 1


def test_sessions_the_plane_ended_for_its_store_are_not_counted_against_the_device(
    plane: RunningPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store failing every batch ends each session with UNAVAILABLE; the agent reconnects a
    second later. Those sessions are the plane's failure: the device is not refused for them."""
    from cloud.service import agent as agent_service
    from edge_agent.errors import Unavailable
    from protos.autoglm.v1 import agent_pb2
    from tests.test_hostile_callers import _prediction

    def failing(*_: object) -> None:
        raise Unavailable("the store is away (injected)")

    clock = FakeClock()
    plane.plane.session_rate.clock = clock
    identity = _device(plane, tmp_path, "victim")
    batch = agent_pb2.AgentMessage(records=agent_pb2.RecordBatch(records=[_prediction(1)]))
    with grpc.secure_channel(plane.device_address, identity.credentials()) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        monkeypatch.setattr(agent_service, "store_batch", failing)
        codes = []
        for _ in range(SESSIONS_PER_WINDOW + 5):
            try:
                list(stub.Session(iter([_hello(), batch]), timeout=30))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.UNAVAILABLE] * (SESSIONS_PER_WINDOW + 5), codes
        monkeypatch.undo()
        # Still served: none of those counted.
        assert _session(plane, channel) is None
