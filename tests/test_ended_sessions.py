"""A session the plane ends while its device does not read the stream (its queue full, or a
newer session of the device opened) is released at once, not when the connection drops: its
call is cut, the hub forgets it, its reader stops; the status reaches the device when it reads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.service import agent
from cloud.service.sessions import LiveSession, SessionHub
from edge_agent.errors import Conflict, RateLimited
from edge_agent.identity import DeviceIdentity
from protos.autoglm.v1 import agent_pb2
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _hello
from tests.test_session_backpressure import Flood, _heartbeat

pytestmark = [pytest.mark.integration]


class PausingFlood(Flood):
    """A Flood that stops sending (without closing its side) once `pause` is set."""

    def __init__(self, plane: RunningPlane, identity: DeviceIdentity) -> None:
        self.pause = threading.Event()
        super().__init__(plane, identity)

    def _messages(self) -> Iterator[agent_pb2.AgentMessage]:
        yield _hello()
        while not self.stop.is_set():
            if self.pause.is_set():
                self.stop.wait()
                return
            self.sent += 1
            yield _heartbeat(self.sent)


async def _session_with_queue(hub: SessionHub, device_id: str, at_least: int) -> LiveSession:
    """The device's session once at least `at_least` answers wait in its queue: its writes
    are stalled (the transport's buffers hold far fewer)."""
    while True:
        for live in hub.sessions(device_id):
            if live.outbound.qsize() >= at_least or live.ending is not None:
                return live
        await asyncio.sleep(0.005)


async def _released(hub: SessionHub, live: LiveSession) -> tuple[bool, bool]:
    """Waits for the session to be released, then for its reader task to stop: (still
    registered, reader still running after 30 s)."""
    await live.released.wait()
    assert live.reader is not None
    await asyncio.wait([live.reader], timeout=30)
    return live in hub.sessions(live.device_id), not live.reader.done()


@pytest.fixture
def quick_cut(monkeypatch: pytest.MonkeyPatch, plane: RunningPlane) -> RunningPlane:
    monkeypatch.setattr(agent, "ENDED_DRAIN_S", 0.2)
    return plane


def test_a_session_ended_for_not_reading_is_released_while_the_device_still_does_not_read(
    quick_cut: RunningPlane, tmp_path: Path
) -> None:
    plane = quick_cut
    identity = _device(plane, tmp_path, "hostile")
    flood = Flood(plane, identity)
    hub = plane.plane.hub
    live = plane.call(_session_with_queue(hub, identity.info.device_id, 10**9), timeout=100)
    assert isinstance(live.ending, RateLimited), live.ending
    registered, readers = plane.call(_released(hub, live), timeout=60)
    assert not registered and not readers, (registered, readers)
    assert not hub.is_open(identity.info.device_id)
    # The device reads at last: what was written before, then the status.
    read, error = flood.drain()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (read, error)
    assert "does not read its stream" in (error.details() or ""), error.details()
    # It may come back, and its new session is served.
    again = DeviceStream.accepted(plane, identity)
    again.send(_heartbeat(1))
    assert again.next("heartbeat_ack").heartbeat_ack.seq == 1
    again.close()


def test_a_replaced_session_whose_device_does_not_read_is_released(
    quick_cut: RunningPlane, tmp_path: Path
) -> None:
    plane = quick_cut
    identity = _device(plane, tmp_path, "stuck")
    flood = PausingFlood(plane, identity)
    hub = plane.plane.hub
    old = plane.call(_session_with_queue(hub, identity.info.device_id, 64), timeout=100)
    flood.pause.set()
    assert old.ending is None, f"ended before it was replaced: {old.ending}"
    newer = DeviceStream.accepted(plane, identity)
    assert isinstance(old.ending, Conflict), old.ending
    registered, readers = plane.call(_released(hub, old), timeout=60)
    assert not registered and not readers, (registered, readers)
    assert len(hub.sessions(identity.info.device_id)) == 1  # the newer one, served
    newer.send(_heartbeat(5))
    assert newer.next("heartbeat_ack").heartbeat_ack.seq == 5
    read, error = flood.drain()
    assert error is not None and error.code() == grpc.StatusCode.ABORTED, (read, error)
    assert "newer session" in (error.details() or ""), error.details()
    newer.close()
