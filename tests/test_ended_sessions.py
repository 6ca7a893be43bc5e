"""A session the plane ends while its device does not read the stream (its queue full, or a
newer session of the device opened) is released at once, not when the connection drops: its
call is cut, the hub forgets it, its reader stops; the status reaches the device when it reads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from cloud.service import agent
from cloud.service.sessions import LiveSession, SessionHub
from edge_agent.errors import Conflict, RateLimited
from edge_agent.identity import DeviceIdentity
from protos.autoglm.v1 import agent_pb2
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _hello
from tests.test_session_backpressure import Flood, _assert_served, _heartbeat

F = TypeVar("F", bound=Flood)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quick_cut")]


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


def _flooding(
    plane: RunningPlane, tmp_path: Path, name: str, kind: type[F]
) -> tuple[DeviceIdentity, F]:
    """A device `name`, enrolled, whose stream `kind` floods the plane and reads nothing."""
    identity = _device(plane, tmp_path, name)
    return identity, kind(plane, identity)


def _stalled_session(plane: RunningPlane, identity: DeviceIdentity, at_least: int) -> LiveSession:
    """The device's session once at least `at_least` answers wait in its queue."""
    device_id = identity.info.device_id
    return plane.call(_session_with_queue(plane.plane.hub, device_id, at_least), timeout=100)


def _assert_released(plane: RunningPlane, live: LiveSession) -> None:
    """The session is released, no longer registered, and its reader stops within 30 s."""
    registered, readers = plane.call(_released(plane.plane.hub, live), timeout=60)
    assert not registered and not readers, (registered, readers)


def _assert_drained_to(flood: Flood, code: grpc.StatusCode, phrase: str) -> None:
    """The device reads at last: its stream ends with `code`, its details saying `phrase`."""
    read, error = flood.drain()
    assert error is not None and error.code() == code, (read, error)
    assert phrase in (error.details() or ""), error.details()


@pytest.fixture
def quick_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session ended is released 0.2 s after, not ENDED_DRAIN_S (every test here)."""
    monkeypatch.setattr(agent, "ENDED_DRAIN_S", 0.2)


def test_a_session_ended_for_not_reading_is_released_while_the_device_still_does_not_read(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity, flood = _flooding(plane, tmp_path, "hostile", Flood)
    live = _stalled_session(plane, identity, 10**9)
    assert isinstance(live.ending, RateLimited), live.ending
    _assert_released(plane, live)
    assert not plane.plane.hub.is_open(identity.info.device_id)
    # The device reads at last: what was written before, then the status.
    _assert_drained_to(flood, grpc.StatusCode.RESOURCE_EXHAUSTED, "does not read its stream")
    # It may come back, and its new session is served.
    again = DeviceStream.accepted(plane, identity)
    _assert_served(again, 1)
    again.close()


def test_a_replaced_session_whose_device_does_not_read_is_released(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity, flood = _flooding(plane, tmp_path, "stuck", PausingFlood)
    old = _stalled_session(plane, identity, 64)
    flood.pause.set()
    assert old.ending is None, f"ended before it was replaced: {old.ending}"
    newer = DeviceStream.accepted(plane, identity)
    assert isinstance(old.ending, Conflict), old.ending
    _assert_released(plane, old)
    assert len(plane.plane.hub.sessions(identity.info.device_id)) == 1  # the newer one, served
    _assert_served(newer, 5)
    _assert_drained_to(flood, grpc.StatusCode.ABORTED, "newer session")
    newer.close()
