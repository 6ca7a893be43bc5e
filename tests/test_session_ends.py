"""The agent tells apart why the control plane ended or refused its session: a busy plane (its
hint followed), this agent not reading its stream (its own slowness: logged as such,
reconnecting at the normal backoff) and a newer session of this device (logged as such); all
three but the last plain one come as RESOURCE_EXHAUSTED, and all were counted as "busy"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloud.service.admission import SessionAdmission
from cloud.service.sessions import OUTBOUND_LIMIT, SessionHub
from cloud.session_claims import FLAP_REPLACEMENTS, FLAP_RETRY_S, SessionClaim, replaced
from edge_agent.errors import (
    RETRY_AFTER_KEY,
    AutoglmError,
    Conflict,
    PermissionDenied,
    RateLimited,
    Unavailable,
    from_rpc_error,
)
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from edge_agent.session import CloudSession
from edge_agent.session_end import SessionEnd, classify
from protos.autoglm.v1 import agent_pb2, common_pb2
from tests.conftest import register
from tests.support.agents import SessionThread, enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream

SESSION_LOG = "edge_agent.session"


class _Status(grpc.RpcError):
    """A status as the agent receives it: code, details, and the retry hint's metadata as
    the plane's interceptor sends it (cloud/service/guard.py)."""

    def __init__(self, error: AutoglmError) -> None:
        self._error = error

    def code(self) -> grpc.StatusCode:
        return self._error.grpc_code

    def details(self) -> str:
        return str(self._error)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        hint = getattr(self._error, "retry_after_s", 0.0)
        return ((RETRY_AFTER_KEY, str(round(hint * 1000))),) if hint > 0 else ()


def _received(error: AutoglmError) -> AutoglmError:
    return from_rpc_error(_Status(error), "cp:1")


def _plane_endings() -> dict[str, AutoglmError]:
    """The errors the control plane's own code ends or refuses sessions with."""

    async def make() -> dict[str, AutoglmError]:
        hub = SessionHub(clock=lambda: 0.0)
        live = hub.open("d1")
        for seq in range(OUTBOUND_LIMIT + 1):
            live.send(seq)
        slow = live.ending
        ended = hub.open("d2")
        hub.open("d2")
        # The store's count (`cloud.session_claims`): past FLAP_REPLACEMENTS, flapping.
        claim = SessionClaim("d2", 1)
        for _ in range(FLAP_REPLACEMENTS + 1):
            claim, counted = replaced(claim, 0.0)
        flapping = hub.open("d2")
        hub.open("d2", replacement=counted)
        admission = SessionAdmission(1)
        with admission.setup():
            try:
                with admission.setup():
                    pass
            except RateLimited as exc:
                busy = exc
        assert slow is not None and ended.ending is not None and flapping.ending is not None
        return {
            "slow": slow,
            "replaced": ended.ending,
            "flapping": flapping.ending,
            "busy": busy,
        }

    return asyncio.run(make())


@pytest.mark.unit
def test_the_planes_endings_are_classified_as_what_they_are() -> None:
    """A contract with cloud/service/sessions.py and admission.py: their messages, received
    over gRPC, each map to their kind (a reworded message fails here)."""
    endings = {name: _received(error) for name, error in _plane_endings().items()}
    kinds = {name: classify(error) for name, error in endings.items()}
    assert kinds == {
        "slow": SessionEnd.NOT_READING,
        "replaced": SessionEnd.REPLACED,
        "flapping": SessionEnd.REPLACED,
        "busy": SessionEnd.BUSY,
    }, {name: str(e) for name, e in endings.items()}
    assert isinstance(endings["slow"], RateLimited) and endings["slow"].retry_after_s == 0
    assert isinstance(endings["replaced"], Conflict)
    flapping = endings["flapping"]
    assert isinstance(flapping, RateLimited) and flapping.retry_after_s == FLAP_RETRY_S
    busy = endings["busy"]
    assert isinstance(busy, RateLimited) and busy.retry_after_s > 0


@pytest.mark.unit
def test_other_statuses_keep_their_kind() -> None:
    assert classify(PermissionDenied("revoked")) is SessionEnd.REFUSED
    assert classify(Unavailable("cp:1: the connection dropped")) is SessionEnd.OTHER
    assert classify(Conflict("someone else changed it")) is SessionEnd.OTHER
    # A RESOURCE_EXHAUSTED the plane says is not about its load is not counted as busy.
    assert classify(RateLimited("ended; it is not busy: something new")) is SessionEnd.OTHER
    # One whose reason is unknown stays "busy" (an older or newer plane's refusal).
    assert classify(RateLimited("too many requests")) is SessionEnd.BUSY


class _Scripted(CloudSession):
    """A session whose attempts fail with the given errors, in turn, without a network; the
    waits it would take are recorded, not slept."""

    def __init__(self, errors: Sequence[AutoglmError], backoff: Backoff) -> None:
        super().__init__(
            identity=None,  # type: ignore[arg-type]
            status=agent_pb2.AgentStatus,
            host=common_pb2.HostFacts,
            backoff=backoff,
            device_address="cp:1",
            tls_server_name="cp",
        )
        self.errors = list(errors)
        self.delays: list[float] = []
        self.stop = asyncio.Event()  # set by the last attempt

    async def _session(self, stop: asyncio.Event) -> None:
        error = self.errors.pop(0)
        if not self.errors:
            stop.set()
        raise error

    def _retry_delay(self) -> float:
        self.delays.append(super()._retry_delay())
        return 0.0


def _run(errors: Sequence[AutoglmError], backoff: Backoff | None = None) -> _Scripted:
    """Runs attempts failing with `errors`, then one more that stops the session (the wait
    after each of `errors` is recorded)."""
    last = Unavailable("cp:1: the test stops here")
    session = _Scripted([*errors, last], backoff or Backoff(1.0, 60.0, jitter=0.0))
    asyncio.run(session.run(session.stop))
    return session


def _logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SESSION_LOG and r.levelno == level]


@pytest.mark.unit
def test_a_session_ended_for_not_reading_is_the_agents_slowness_not_a_busy_plane(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SESSION_LOG)
    slow = _received(_plane_endings()["slow"])
    session = _run([slow])
    stats = session.stats
    assert stats.busy_refusals == 0, stats  # it was counted as a busy refusal
    assert (stats.not_reading_ends, stats.replaced) == (1, 0), stats
    assert stats.attempts_failed == 2
    # The normal backoff's first step (no hint), not a busy plane's wait.
    assert session.delays == [1.0], session.delays
    warnings = _logged(caplog, logging.WARNING)
    assert any("did not read its stream" in w and "too slow" in w for w in warnings), warnings
    infos = _logged(caplog, logging.INFO)
    assert not any("busy" in i for i in infos), infos


@pytest.mark.unit
def test_a_replaced_session_is_logged_as_such_and_a_flapping_ones_hint_is_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SESSION_LOG)
    endings = _plane_endings()
    replaced, flapping = _received(endings["replaced"]), _received(endings["flapping"])
    session = _run([replaced, flapping], Backoff(1.0, 300.0, jitter=0.0))
    stats = session.stats
    assert stats.busy_refusals == 0, stats  # the flapping one was counted as busy
    assert stats.replaced == 2, stats
    assert session.delays[0] == 1.0, session.delays
    assert FLAP_RETRY_S * 0.5 <= session.delays[1] <= FLAP_RETRY_S * 1.5, session.delays
    warnings = [w for w in _logged(caplog, logging.WARNING) if "newer session" in w]
    assert len(warnings) == 2, warnings
    assert all("a newer session of this device opened" in w for w in warnings), warnings
    assert "cloned image" in warnings[0], warnings


@pytest.mark.unit
def test_a_busy_refusal_is_counted_and_its_hint_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, SESSION_LOG)
    busy = RateLimited("the control plane is busy opening 64 sessions", retry_after_s=20.0)
    session = _run([busy, busy], Backoff(1.0, 300.0, jitter=0.0))
    assert session.stats.busy_refusals == 2 and session.stats.not_reading_ends == 0
    assert all(10.0 <= d <= 30.0 for d in session.delays), session.delays
    infos = _logged(caplog, logging.INFO)
    assert sum("refused for now (the control plane is busy)" in i for i in infos) == 2, infos


@pytest.mark.unit
def test_a_retry_hint_is_followed_whatever_the_reason() -> None:
    slow = RateLimited(
        "the control plane ended this session; it is not busy: ... it does not read its stream",
        retry_after_s=5.0,
    )
    session = _run([slow, slow], Backoff(1.0, 300.0, jitter=0.0))
    assert session.stats.busy_refusals == 0 and session.stats.not_reading_ends == 2
    assert all(2.5 <= d <= 7.5 for d in session.delays), session.delays


# Over a real control plane: its sessions end as it ends them (cloud/service/sessions.py).


def _enrolled(plane: RunningPlane, tmp_path: Path, name: str) -> Any:
    return enroll_identity(register(plane, name), tmp_path / name)


@contextlib.contextmanager
def _in_session(
    plane: RunningPlane, tmp_path: Path, name: str
) -> Iterator[tuple[DeviceIdentity, SessionThread]]:
    """An enrolled agent `name` whose first session is open: (its identity, the agent),
    stopped after the block. Heartbeats every 5 s (backoff 0.1 s .. 0.5 s)."""
    identity = _enrolled(plane, tmp_path, name)
    agent = start_session(identity, heartbeat_interval_s=5.0)
    try:
        wait_for(lambda: agent.session.stats.sessions_opened == 1, timeout=30)
        yield identity, agent
    finally:
        agent.stop()


async def _overfill(plane: RunningPlane, device_id: str) -> int:
    """Queues more than OUTBOUND_LIMIT messages for the device's session in one turn of the
    plane's loop, as for an agent that does not read: the plane ends the session."""
    sessions = plane.plane.hub.sessions(device_id)
    ack = agent_pb2.ControlMessage(heartbeat_ack=agent_pb2.HeartbeatAck(seq=0))
    for live in sessions:
        for _ in range(OUTBOUND_LIMIT + 1):
            live.send(ack)
    return len(sessions)


@pytest.mark.integration
def test_over_grpc_a_session_the_plane_ends_for_not_reading_reconnects_promptly(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, SESSION_LOG)
    with _in_session(plane, tmp_path, "slow-1") as (identity, agent):
        assert plane.call(_overfill(plane, identity.info.device_id)) == 1
        took = wait_for(lambda: agent.session.stats.sessions_opened == 2, timeout=30)
        stats = agent.session.stats
        assert "does not read its stream" in stats.last_error, stats.last_error
        assert stats.busy_refusals == 0, stats
        assert (stats.not_reading_ends, stats.replaced) == (1, 0), stats
        warnings = _logged(caplog, logging.WARNING)
        assert any("did not read its stream" in w for w in warnings), warnings
        waits = [r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()]
        assert waits == ["reconnecting in 0.1s"], (waits, f"reconnected after {took:.1f}s")


@pytest.mark.integration
def test_over_grpc_a_replaced_session_is_logged_as_replaced(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, SESSION_LOG)
    other: DeviceStream | None = None
    try:
        with _in_session(plane, tmp_path, "twin-1") as (identity, agent):
            other = DeviceStream.accepted(plane, identity)  # the same device, a newer session
            wait_for(lambda: "newer session" in agent.session.stats.last_error, timeout=30)
            assert agent.session.stats.busy_refusals == 0, agent.session.stats
            assert agent.session.stats.replaced == 1, agent.session.stats
            warnings = _logged(caplog, logging.WARNING)
            assert any("a newer session of this device opened" in w for w in warnings), warnings
    finally:
        if other is not None:
            other.close()
