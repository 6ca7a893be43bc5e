"""Opens this replica's sessions under a claim of their device (`cloud.session_claims`) and
ends those a newer claim replaced: at once when the store's notification of the newer one
arrives (before or after the older registers here), and at each periodic recheck (a
notification lost to a dropped connection delays the end, never loses it).

Each replaced session is counted once: the sessions whose replacement is being counted (by a
notification's task, the recheck, or the setup whose claim replaces them) are set apart, and
the others skip them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cloud.service.sessions import FLEET_SLICE, LiveSession, SessionHub
from cloud.store.base import SessionClaimStore
from edge_agent.errors import Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)
# Devices whose newest claim heard is kept (the oldest forgotten first). It only matters from
# a setup's claim until its session registers here; one forgotten sooner waits for the
# recheck.
HEARD_DEVICES = 10_000


@dataclass(frozen=True)
class _Heard:
    """The newest claim of a device that a notification told of."""

    generation: int
    replica: str
    at: float  # time.monotonic() when heard


class ReplacedSessions:
    """Opens sessions under their device's next claim and ends this replica's sessions
    replaced by a newer one, each replacement counted in the store once (so a device
    flapping across replicas is told to come back later)."""

    def __init__(self, store: SessionClaimStore, hub: SessionHub, replica: str) -> None:
        self.store = store
        self.hub = hub
        self.replica = replica  # named in the claims of the sessions opened here
        self._heard: OrderedDict[str, _Heard] = OrderedDict()  # see HEARD_DEVICES
        self._ending: set[LiveSession] = set()  # sessions whose replacement is being counted
        self._tasks: set[asyncio.Task[int]] = set()

    async def open(self, device_id: str, fingerprint: str = "", peer: str = "") -> LiveSession:
        """Claims the device's next generation and registers its session here (event loop
        only): the older sessions here end, their replacement counted in the claim; and the
        new one ends at once when a newer claim was heard while this one was taken."""
        replacing = self._take(self.hub.sessions(device_id))
        asked = time.monotonic()
        try:
            claim, replacement = await asyncio.to_thread(
                self.store.claim_session,
                device_id,
                self.replica,
                peer,
                self.hub.clock(),
                bool(replacing),
            )
            live = self.hub.open(
                device_id, fingerprint, peer, claim.generation, replacement, claim.replica
            )
        finally:
            self._ending.difference_update(replacing)
            # Not ended by this setup (it failed): a newer claim heard meanwhile ends them.
            self._end_older(device_id, (s for s in replacing if s.ending is None))
        heard = self._heard.get(device_id)
        if heard is not None and heard.at >= asked:  # (one heard before is of an older claim)
            self._end_older(device_id, [live])
        return live

    async def check(self, device_ids: Sequence[str]) -> int:
        """Reads the newest claims of `device_ids` and ends the sessions here that opened
        before the read under another claim; how many ended (event loop only)."""
        if not device_ids:
            return 0
        since = time.monotonic()
        newest = await asyncio.to_thread(self.store.newest_sessions, device_ids)
        replaced: dict[str, list[LiveSession]] = {}
        for live in self._take(self.hub.replaced_by(newest, since)):
            replaced.setdefault(live.device_id, []).append(live)
        ended = 0
        try:
            for i, sessions in enumerate(replaced.values()):
                if i and i % FLEET_SLICE == 0:
                    await asyncio.sleep(0)
                ended += await self._end(sessions)
        finally:  # those left when counting failed: the next check or notification
            for sessions in replaced.values():
                self._ending.difference_update(sessions)
        return ended

    def heard(self, device_id: str, generation: int, replica: str) -> None:
        """`replica` claimed the device's session `generation` (event loop only): older ones
        here end (one of this replica's own setups ends those it replaces itself)."""
        self._heard[device_id] = _Heard(generation, replica, time.monotonic())
        self._heard.move_to_end(device_id)
        if len(self._heard) > HEARD_DEVICES:
            self._heard.popitem(last=False)
        self._end_older(device_id, self.hub.sessions(device_id))

    def _end_older(self, device_id: str, sessions: Iterable[LiveSession]) -> None:
        """Ends those of `sessions` older than the newest claim heard of the device."""
        heard = self._heard.get(device_id)
        if heard is None:
            return
        older = self._take(s for s in sessions if 0 < s.generation < heard.generation)
        if older:
            task = asyncio.create_task(self._end(older))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _take(self, sessions: Iterable[LiveSession]) -> list[LiveSession]:
        """Those of `sessions` still open and not being ended, set apart."""
        taken = [s for s in sessions if s.ending is None and s not in self._ending]
        self._ending.update(taken)
        return taken

    def _done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, (Unavailable, Conflict)):  # the store away or busy: the
            log.warning("ending a replaced session failed: %s", error)  # recheck tries again
        else:
            log.error("ending a replaced session failed", exc_info=error)

    async def _end(self, sessions: list[LiveSession]) -> int:
        """Counts the replacement of one device's sessions (taken) and ends them."""
        device_id = sessions[0].device_id
        try:
            counted = await asyncio.to_thread(
                self.store.count_replacement, device_id, self.hub.clock()
            )
        except NotFound:  # deleted meanwhile: the recheck of credentials ends its sessions
            return 0
        finally:
            self._ending.difference_update(sessions)
        open_still = [live for live in sessions if live.ending is None]
        self.hub.end_replaced(open_still, *counted)
        return len(open_still)
