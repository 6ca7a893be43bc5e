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
from edge_agent.errors import Conflict, NotFound, Unavailable
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
        self.answering: dict[str, threading.Event] = {}  # replica -> set to let its claim answer
        self.claimed: dict[str, threading.Event] = {}  # replica -> set once its claim committed
        self.reading: threading.Event | None = None  # set to let newest_sessions answer
        self.read_begun = threading.Event()

    def claim(self, device_id: str, replica: str, peer: str = "") -> SessionClaim:
        self.claims[device_id] = opened(self.claims.get(device_id), device_id, replica, peer)
        return self.claims[device_id]

    def claim_session(
        self, device_id: str, replica: str, peer: str, now: float, replacing: bool
    ) -> tuple[SessionClaim, Replacement | None]:
        """As the SQL store: committed at once; then the answer waits for `answering` when
        set (a setup's thread not scheduled yet), `claimed` told when it is committed."""
        claim, counted = self.claim(device_id, replica, peer), None
        if replacing:
            self.counted[device_id] = self.counted.get(device_id, 0) + 1
            claim, counted = replaced(claim, now)
            self.claims[device_id] = claim
        self.claimed.setdefault(replica, threading.Event()).set()
        if (gate := self.answering.get(replica)) is not None:
            assert gate.wait(30), "the test never let the claim answer"
        return claim, counted

    def newest_sessions(self, device_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        found = {
            d: (self.claims[d].generation, self.claims[d].replica)
            for d in device_ids
            if d in self.claims
        }
        if self.reading is not None:  # what was read waits to be answered
            self.read_begun.set()
            assert self.reading.wait(30), "the test never let the read go on"
        return found

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


async def _wait(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30), "what the test waits for never happened"


def _setup() -> tuple[ClaimsStub, ReplacedSessions]:
    """Replica r-1's sessions, on a store kept in memory."""
    store, hub = ClaimsStub(), SessionHub(clock=lambda: 0.0)
    return store, ReplacedSessions(store, hub, "r-1")  # type: ignore[arg-type]


def test_a_replacement_heard_while_the_recheck_counts_another_device_is_counted_once() -> None:
    """The recheck finds two devices replaced on r-2 and counts the first slowly; the second's
    notification arrives meanwhile: each replacement is counted once, not twice (a second
    count would make a device flapping after two real replacements)."""

    async def scenario() -> tuple[dict[str, int], list[LiveSession]]:
        store, replacements = _setup()
        sessions = [await replacements.open(d) for d in ("x", "y")]
        for d in ("x", "y"):  # both reconnect through r-2; its notifications are on their way
            store.claim(d, "r-2")
        store.busy["x"] = threading.Event()
        check = asyncio.create_task(replacements.check(["x", "y"]))
        await _wait(store.counting.setdefault("x", threading.Event()))
        replacements.heard("y", 2, "r-2")
        await _settled(replacements)
        store.busy["x"].set()
        assert await check >= 1
        await _settled(replacements)
        return store.counted, sessions

    counted, sessions = asyncio.run(scenario())
    assert counted == {"x": 1, "y": 1}, counted
    assert all(isinstance(s.ending, Conflict) for s in sessions), [s.ending for s in sessions]


def test_a_setup_replacing_a_session_here_and_a_notification_count_it_once() -> None:
    """r-2's claim (2) is heard while this replica's new claim (3), which replaces the session
    here, is taken: the session here is counted once, by the claim (r-2 counts its own)."""

    async def scenario() -> tuple[dict[str, int], LiveSession, LiveSession]:
        store, replacements = _setup()
        first = await replacements.open("d1")
        newer = store.claim("d1", "r-2")  # its notification still on its way
        store.answering["r-1"] = threading.Event()
        setup = asyncio.create_task(replacements.open("d1"))
        await _wait(store.claimed.setdefault("r-1", threading.Event()))
        replacements.heard("d1", newer.generation, newer.replica)
        await _settled(replacements)
        store.answering["r-1"].set()
        second = await setup
        await _settled(replacements)
        return store.counted, first, second

    counted, first, second = asyncio.run(scenario())
    assert counted == {"d1": 1}, counted
    assert isinstance(first.ending, Conflict) and second.ending is None, (first, second)


def test_a_newer_claim_heard_before_the_older_session_registers_ends_it() -> None:
    """This replica's claim (5) is committed, r-2's (6) too, and r-2's notification arrives
    before this replica's setup has registered its session: that session ends as it opens,
    counted, instead of staying open beside r-2's until the recheck."""

    async def scenario() -> tuple[dict[str, int], LiveSession]:
        store, replacements = _setup()
        store.claims["d1"] = SessionClaim("d1", 4, "r-2")
        store.answering["r-1"] = threading.Event()
        setup = asyncio.create_task(replacements.open("d1"))
        await _wait(store.claimed.setdefault("r-1", threading.Event()))
        newer = store.claim("d1", "r-2", "ipv4:10.0.0.2:7")
        replacements.heard("d1", newer.generation, newer.replica)
        store.answering["r-1"].set()
        live = await setup
        await _settled(replacements)
        return store.counted, live

    counted, live = asyncio.run(scenario())
    assert live.generation == 5 and isinstance(live.ending, Conflict), live
    assert "on replica r-2" in str(live.ending), live.ending
    assert counted == {"d1": 1}, counted


def test_a_claim_heard_before_a_setup_asked_for_its_own_does_not_end_it() -> None:
    """A notification heard earlier (here: of a generation the store no longer has, restored
    from an older backup) does not end a session whose claim was taken after it."""

    async def scenario() -> LiveSession:
        _, replacements = _setup()
        replacements.heard("d1", 9, "r-2")
        live = await replacements.open("d1")
        await _settled(replacements)
        return live

    live = asyncio.run(scenario())
    assert live.generation == 1 and live.ending is None, live


def test_two_setups_whose_claims_return_out_of_order_keep_the_newer_session() -> None:
    """Two setups of one device on one replica: the claim of generation 6 registers first;
    when 5's returns, it is 5 that ends, not 6."""

    async def scenario() -> tuple[LiveSession, LiveSession, list[LiveSession]]:
        hub = SessionHub()
        newer = hub.open("d1", peer="ipv4:10.0.0.1:2", generation=6)
        older = hub.open("d1", peer="ipv4:10.0.0.1:1", generation=5)
        return newer, older, hub.sessions("d1")

    newer, older, held = asyncio.run(scenario())
    assert newer.ending is None and held == [newer], (newer, held)
    assert isinstance(older.ending, Conflict) and "ipv4:10.0.0.1:2" in str(older.ending), older


def test_the_recheck_ends_sessions_whose_claim_is_not_the_newest_whatever_its_order() -> None:
    """The recheck compares each session's claim with the store's newest: a session of this
    replica whose newer claim's setup was cancelled before it registered ends, and so does
    one of a generation the store no longer has (restored from an older backup); a session
    opened after the store was read is not judged by that read."""

    async def scenario() -> tuple[int, list[LiveSession], dict[str, int]]:
        store, replacements = _setup()
        own = await replacements.open("own")
        store.claim("own", "r-1")  # a setup of this replica, cancelled after its claim
        restored = [await replacements.open("restored") for _ in range(3)][-1]
        store.claims["restored"] = SessionClaim("restored", 2, "r-2")
        kept = await replacements.open("kept")
        store.reading = threading.Event()
        check = asyncio.create_task(replacements.check(["own", "restored", "kept"]))
        await _wait(store.read_begun)
        later = await replacements.open("kept")  # newer than what the read found
        store.reading.set()
        ended = await check
        return ended, [own, restored, kept, later], store.counted

    ended, (own, restored, kept, later), counted = asyncio.run(scenario())
    assert isinstance(own.ending, Conflict) and isinstance(restored.ending, Conflict), (
        own.ending,
        restored.ending,
    )
    assert later.ending is None and isinstance(kept.ending, Conflict), (later, kept)
    assert ended == 2, ended
    assert counted == {"own": 1, "restored": 3, "kept": 1}, counted
