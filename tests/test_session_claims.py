"""Session claims at their edges: a setup whose claim fails records no session, and the
sessions a newer claim replaced end once, counted once, whatever order the claims, their
notifications and the periodic recheck arrive in (`cloud.service.replacements`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloud.clock import utc_now
from cloud.service.replacements import ReplacedSessions
from cloud.service.sessions import LiveSession, SessionHub
from cloud.session_claims import FLAP_REPLACEMENTS, Replacement, SessionClaim, opened, replaced
from cloud.store import Store
from edge_agent.errors import NotFound, Unavailable
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _hello

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Unavailable("the database cannot be used now; try again: down"), "UNAVAILABLE"),
        (NotFound("no device with id 'x'"), "NOT_FOUND"),  # deleted while it was set up
    ],
)
def test_a_setup_whose_claim_fails_leaves_the_device_offline(
    plane: RunningPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: str,
) -> None:
    identity = _device(plane, tmp_path, "pump")
    store: Store = plane.plane.store

    def claim_fails(*args: Any) -> Any:
        raise error

    monkeypatch.setattr(store, "claim_session", claim_fails)
    stream = DeviceStream(plane, identity)
    stream.send(_hello())
    ended = stream.ending()
    stream.close()
    assert ended is not None and ended.code() == getattr(grpc.StatusCode, code), ended
    device_id = identity.info.device_id
    plane.flush_presence()
    record = store.get_device(device_id)
    assert not record.session_open, record
    assert not plane.call(_is_open(plane, device_id))


async def _is_open(running: RunningPlane, device_id: str) -> bool:
    return running.plane.hub.is_open(device_id)


def test_a_failing_check_of_replaced_sessions_does_not_skip_the_revocations(
    plane: RunningPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic recheck ends sessions of devices revoked through another replica even
    when finding replaced sessions fails that round (its error still reaches the job's log)."""
    identity = _device(plane, tmp_path, "pump")
    stream = DeviceStream.accepted(plane, identity)

    async def check_fails(device_ids: Any) -> int:
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(plane.plane.replaced, "check", check_fails)
    # Revoked in the store only, as another replica does: this one learns it at its recheck.
    plane.plane.store.revoke_device(identity.info.device_id, "stolen", utc_now())
    with pytest.raises(RuntimeError, match="a bug in the check"):
        plane.call(plane.plane._recheck_sessions())
    ended = stream.ending()
    stream.close()
    assert ended is not None and ended.code() == grpc.StatusCode.PERMISSION_DENIED, ended


def test_a_claim_that_starts_the_flapping_warns_even_with_nothing_left_here_to_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store counted the replacement that made the device flapping, but the session it
    replaced ended meanwhile: the one warning fleet-wide is still given."""
    caplog.set_level(logging.WARNING, "cloud.service.sessions")

    async def scenario() -> LiveSession:
        hub = SessionHub()
        started = Replacement(flapping=True, started=True, recent=FLAP_REPLACEMENTS + 1)
        return hub.open("d1", peer="ipv4:10.0.0.2:7", generation=5, replacement=started)

    live = asyncio.run(scenario())
    assert live.ending is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "d1" in warnings[0], warnings
    assert "ipv4:10.0.0.2:7" in warnings[0], warnings


class ClaimsStub:
    """The store's session claims, kept in memory as the SQL store keeps them; `counting`
    makes count_replacement fail, or wait for an event (a busy database)."""

    def __init__(self) -> None:
        self.claims: dict[str, SessionClaim] = {}
        self.counted: dict[str, int] = {}
        self.fails: Exception | None = None
        self.busy: dict[str, threading.Event] = {}  # device id -> set to let its count go on
        self.counting: dict[str, threading.Event] = {}  # device id -> set when its count began

    def claim(self, device_id: str, replica: str, peer: str = "") -> SessionClaim:
        self.claims[device_id] = opened(self.claims.get(device_id), device_id, replica, peer)
        return self.claims[device_id]

    def newest_sessions(self, device_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        return {
            d: (self.claims[d].generation, self.claims[d].replica)
            for d in device_ids
            if d in self.claims
        }

    def count_replacement(self, device_id: str, now: float) -> tuple[SessionClaim, Any]:
        self.counting.setdefault(device_id, threading.Event()).set()
        if (gate := self.busy.get(device_id)) is not None:
            assert gate.wait(30), "the test never let the count go on"
        if self.fails is not None:
            raise self.fails
        self.counted[device_id] = self.counted.get(device_id, 0) + 1
        self.claims[device_id], counted = replaced(self.claims[device_id], now)
        return self.claims[device_id], counted


async def _settled(replacements: ReplacedSessions) -> None:
    """Waits for the ends `heard` started (their done callbacks run first)."""
    while replacements._tasks:
        await asyncio.gather(*replacements._tasks, return_exceptions=True)


@pytest.mark.parametrize(
    ("error", "level", "traceback"),
    [
        (Unavailable("the database cannot be used now; try again: down"), logging.WARNING, False),
        (RuntimeError("a bug"), logging.ERROR, True),
    ],
)
def test_ending_a_replaced_session_that_fails_is_logged_by_what_failed(
    caplog: pytest.LogCaptureFixture, error: Exception, level: int, traceback: bool
) -> None:
    """The store away is one line (the recheck tries again); anything else is a bug, logged
    with its traceback."""
    caplog.set_level(logging.WARNING, "cloud.service.replacements")

    async def scenario() -> None:
        store, hub = ClaimsStub(), SessionHub(clock=lambda: 0.0)
        replacements = ReplacedSessions(store, hub, "r-1")  # type: ignore[arg-type]
        hub.open("d1", generation=store.claim("d1", "r-1").generation)
        newer = store.claim("d1", "r-2")
        store.fails = error
        replacements.heard("d1", newer.generation, newer.replica)
        await _settled(replacements)

    asyncio.run(scenario())
    records = [r for r in caplog.records if r.name == "cloud.service.replacements"]
    assert [(r.levelno, r.exc_info is not None) for r in records] == [(level, traceback)], [
        (r.levelname, r.getMessage()) for r in records
    ]
    assert str(error) in records[0].getMessage() or traceback, records[0].getMessage()
