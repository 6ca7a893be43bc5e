"""A device that sends without reading its session stream: the plane's queue for that session
stays bounded and the session ends with RESOURCE_EXHAUSTED saying why, while other devices'
sessions go on; a device holds one session, a newer one ends the older, and sessions that keep
replacing one another are told to come back later."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.service.sessions import END_OF_STREAM, OUTBOUND_LIMIT, LiveSession, SessionHub
from cloud.session_claims import (
    FLAP_FORGET_S,
    FLAP_REPLACEMENTS,
    FLAP_RETRY_S,
    SessionClaim,
    opened,
    replaced,
)
from edge_agent.errors import RETRY_AFTER_KEY, Conflict, PermissionDenied, RateLimited
from edge_agent.identity import DeviceIdentity
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _hello

pytestmark = [pytest.mark.integration]


def _heartbeat(seq: int) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq))


def _assert_served(stream: DeviceStream, seq: int) -> None:
    """The stream's session is served: its heartbeat `seq` is answered."""
    stream.send(_heartbeat(seq))
    assert stream.next("heartbeat_ack").heartbeat_ack.seq == seq


def _assert_replaced(older: DeviceStream, *phrases: str) -> None:
    """The older stream ended ABORTED (a newer session replaced it), its details saying each
    of `phrases`."""
    ended = older.ending()
    assert ended is not None and ended.code() == grpc.StatusCode.ABORTED, ended
    details = ended.details() or ""
    assert all(phrase in details for phrase in phrases), details


class Flood:
    """A device sending heartbeats in a tight loop and reading nothing until `drain`. Its
    channel probes no bandwidth, so its transport grants the plane no more than HTTP/2's
    initial window until the stream is read: what the plane answers piles up there."""

    def __init__(self, plane: RunningPlane, identity: DeviceIdentity) -> None:
        # The heartbeats are the flood: the plane's allowance per session (about one a
        # second, `cloud.service.heartbeat_limit`) would drop them before answers pile up.
        plane.plane.heartbeat_limit.burst = 10**9
        self.channel = grpc.secure_channel(
            plane.device_address, identity.credentials(), options=[("grpc.http2.bdp_probe", 0)]
        )
        self.stop = threading.Event()
        self.sent = 0
        self.call = agent_pb2_grpc.AgentServiceStub(self.channel).Session(
            self._messages(), timeout=120
        )

    def _messages(self) -> Iterator[agent_pb2.AgentMessage]:
        yield _hello()
        while not self.stop.is_set():
            self.sent += 1
            yield _heartbeat(self.sent)

    def drain(self) -> tuple[int, grpc.RpcError | None]:
        """Reads the stream to its end: (messages read, the error it ended with)."""
        self.stop.set()
        read = 0
        try:
            for _ in self.call:
                read += 1
        except grpc.RpcError as exc:
            return read, exc
        finally:
            self.channel.close()
        return read, None


async def _watch(hub: SessionHub, device_id: str, within_s: float) -> tuple[int, object]:
    """(the largest queue seen for the device's session, why it ended or None) once it
    ends, once the queue is far past any bound, or after `within_s`."""
    loop = asyncio.get_running_loop()
    peak, until = 0, loop.time() + within_s
    while loop.time() < until and peak <= 10 * OUTBOUND_LIMIT:
        for live in hub.sessions(device_id):
            peak = max(peak, live.outbound.qsize())
            if live.ending is not None:
                return peak, live.ending
        await asyncio.sleep(0.005)
    return peak, None


async def _closed(hub: SessionHub, device_id: str, within_s: float) -> bool:
    loop = asyncio.get_running_loop()
    until = loop.time() + within_s
    while hub.is_open(device_id) and loop.time() < until:
        await asyncio.sleep(0.01)
    return not hub.is_open(device_id)


def test_a_device_that_never_reads_its_stream_is_ended_with_a_bounded_queue(
    plane: RunningPlane, tmp_path: Path
) -> None:
    good = DeviceStream.accepted(plane, _device(plane, tmp_path, "good"))
    identity = _device(plane, tmp_path, "hostile")
    device_id = identity.info.device_id
    flood = Flood(plane, identity)
    hub = plane.plane.hub
    peak, ending = plane.call(_watch(hub, device_id, within_s=90), timeout=120)
    assert isinstance(ending, RateLimited), (
        f"after {flood.sent} heartbeats: ending {ending!r}, queue peaked at {peak} messages"
    )
    assert peak <= OUTBOUND_LIMIT, f"queue peaked at {peak} > {OUTBOUND_LIMIT}"
    # While the hostile stream sits unread, the other device is answered.
    _assert_served(good, 7)
    read, error = flood.drain()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (
        f"read {read} messages, then {error}"
    )
    assert "does not read its stream" in (error.details() or ""), error.details()
    assert plane.call(_closed(hub, device_id, within_s=30), timeout=60)
    # It may come back, and its new session is served.
    again = DeviceStream.accepted(plane, identity)
    _assert_served(again, 1)
    again.close()
    good.close()


def test_a_new_session_of_a_device_ends_its_older_one(plane: RunningPlane, tmp_path: Path) -> None:
    identity = _device(plane, tmp_path, "twin")
    first = DeviceStream.accepted(plane, identity)
    second = DeviceStream.accepted(plane, identity)
    _assert_replaced(first, "newer session")
    _assert_served(second, 3)
    sessions = plane.call(_sessions(plane.plane.hub, identity.info.device_id))
    assert len(sessions) == 1, sessions
    first.close()
    second.close()


async def _sessions(hub: SessionHub, device_id: str) -> list[LiveSession]:
    return hub.sessions(device_id)


def test_a_full_queue_is_dropped_for_the_error_and_the_first_reason_stands() -> None:
    async def scenario() -> tuple[int, list[object]]:
        live = SessionHub().open("d1")
        for seq in range(OUTBOUND_LIMIT + 1):
            live.send(seq)
        live.end(PermissionDenied("revoked meanwhile"))  # too late: it has ended already
        live.send("after the end")
        size = live.outbound.qsize()
        return size, [live.outbound.get_nowait() for _ in range(size)]

    size, queued = asyncio.run(scenario())
    assert size == 1 and isinstance(queued[0], RateLimited), queued
    assert "does not read its stream" in str(queued[0])
    # An agent counts RESOURCE_EXHAUSTED as "busy"; the detail it logs says otherwise.
    assert "ended this session; it is not busy" in str(queued[0])


def test_the_clean_end_of_a_stream_goes_past_a_full_queue() -> None:
    """The client half-closed while the queue held OUTBOUND_LIMIT answers (its last batch
    acks among them): they are sent, then the stream ends OK. The end marker went through
    the bounded send and ended the session RESOURCE_EXHAUSTED, dropping the acks."""

    async def scenario() -> tuple[object, list[object]]:
        live = SessionHub().open("d1")
        for seq in range(OUTBOUND_LIMIT):
            live.send(seq)
        live.finish()
        live.send("a push after the end")  # not written: dropped, not ending the session
        live.end(PermissionDenied("revoked meanwhile"))
        return live.ending, [live.outbound.get_nowait() for _ in range(live.outbound.qsize())]

    ending, queued = asyncio.run(scenario())
    assert ending is None
    assert queued == [*range(OUTBOUND_LIMIT), END_OF_STREAM], queued[-3:]


def test_an_ending_with_room_comes_after_what_is_queued() -> None:
    async def scenario() -> list[object]:
        hub = SessionHub()
        old = hub.open("d1")
        old.send("queued")
        hub.open("d1")
        return [old.outbound.get_nowait() for _ in range(old.outbound.qsize())]

    queued = asyncio.run(scenario())
    assert queued[0] == "queued" and isinstance(queued[1], Conflict), queued


def test_sessions_that_keep_replacing_one_another_are_told_to_come_back_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two agents with one certificate end each other's session at each reconnect: past
    FLAP_REPLACEMENTS within FLAP_WINDOW_S one warning names the device and both peers, and
    the session replaced ends with a retry hint; after a quiet FLAP_FORGET_S, plain ABORTED.
    The count is the store's (`cloud.session_claims`), here kept as the store would."""
    caplog.set_level(logging.INFO, "cloud.service.sessions")

    async def scenario() -> list[LiveSession]:
        hub = SessionHub()
        claim: SessionClaim | None = None

        def reopen(now: float, peer: str) -> LiveSession:
            nonlocal claim
            claim = opened(claim, "d1", "r-1", peer)
            counted = None
            if hub.is_open("d1"):
                claim, counted = replaced(claim, now)
            return hub.open("d1", peer=peer, generation=claim.generation, replacement=counted)

        opened_ = [reopen(0.0, "ipv4:10.0.0.1:100")]
        for i in range(1, 7):  # the two clones, one second apart
            opened_.append(reopen(float(i), f"ipv4:10.0.0.{1 + i % 2}:{100 + i}"))
        opened_.append(reopen(6 + FLAP_FORGET_S + 1, "ipv4:10.0.0.1:200"))
        return opened_

    sessions = asyncio.run(scenario())
    endings = [live.ending for live in sessions]
    assert [type(e) for e in endings] == [
        *[Conflict] * FLAP_REPLACEMENTS,
        *[RateLimited] * (6 - FLAP_REPLACEMENTS),
        Conflict,  # quiet long enough: forgotten
        type(None),  # the newest is open
    ], endings
    assert [s.generation for s in sessions] == list(range(1, 9))
    hinted = [e for e in endings if isinstance(e, RateLimited)]
    assert all(e.retry_after_s == FLAP_RETRY_S for e in hinted)
    assert "not busy" in str(hinted[0]) and "one certificate" in str(hinted[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert (
        "d1" in warnings[0]
        and "from ipv4:10.0.0.1:104 ending one from ipv4:10.0.0.2:103" in (warnings[0])
    )


def test_two_streams_with_one_identity_that_keep_reconnecting_are_given_a_retry_hint(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "cloud.service.sessions")
    plane.plane.hub.clock = lambda: 0.0  # every replacement within FLAP_WINDOW_S
    identity = _device(plane, tmp_path, "clone")
    streams: list[DeviceStream] = []
    for _ in range(FLAP_REPLACEMENTS + 2):  # agents "a" and "b" in turns
        stream = DeviceStream.accepted(plane, identity)
        streams.append(stream)
    endings = [s.ending() for s in streams[:-1]]
    codes = [e.code() if e is not None else None for e in endings]
    assert codes == [grpc.StatusCode.ABORTED] * FLAP_REPLACEMENTS + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ], codes
    hinted = endings[-1]
    assert hinted is not None and "keep replacing one another" in (hinted.details() or "")
    assert (RETRY_AFTER_KEY, str(round(FLAP_RETRY_S * 1000))) in (hinted.trailing_metadata() or ())
    warnings = [r.getMessage() for r in caplog.records if r.name == "cloud.service.sessions"]
    assert len(warnings) == 1 and identity.info.device_id in warnings[0], warnings
    assert warnings[0].count("ipv4:127.0.0.1:") == 2, warnings  # the newest peer, the older
    _assert_served(streams[-1], 1)  # the newest is served
    for stream in streams:
        stream.close()
