"""Ends the sessions this replica holds that a newer session of their device, opened on
another replica, replaced (`cloud.session_claims`): at once when the store's notification of
the newer session arrives, and at each periodic recheck (a notification lost to a dropped
connection delays the end, never loses it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cloud.service.sessions import FLEET_SLICE, LiveSession, SessionHub
from cloud.store.base import SessionClaimStore
from edge_agent.errors import Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)


class ReplacedSessions:
    """Finds this replica's sessions replaced elsewhere and ends them, each replacement
    counted in the store (so a device flapping across replicas is told to come back later)."""

    def __init__(self, store: SessionClaimStore, hub: SessionHub, replica: str) -> None:
        self.store = store
        self.hub = hub
        self.replica = replica  # the sessions this replica opens replace older ones at once
        self._ending: set[str] = set()  # devices whose replacement is being counted
        self._tasks: set[asyncio.Task[int]] = set()

    async def check(self, device_ids: Sequence[str]) -> int:
        """Reads the newest generations of `device_ids` and ends the sessions here they
        replaced; how many ended (event loop only)."""
        if not device_ids:
            return 0
        newest = await asyncio.to_thread(self.store.newest_sessions, device_ids)
        replaced: dict[str, list[LiveSession]] = {}
        for live in self.hub.superseded(newest, self.replica):
            replaced.setdefault(live.device_id, []).append(live)
        ended = 0
        for i, sessions in enumerate(replaced.values()):
            if i and i % FLEET_SLICE == 0:
                await asyncio.sleep(0)
            ended += await self._end(sessions)
        return ended

    def heard(self, device_id: str, generation: int, replica: str) -> None:
        """`replica` opened the device's session `generation` (event loop only): an older
        one here ends, unless this replica opened it (then it has ended already)."""
        older = self.hub.superseded({device_id: (generation, replica)}, self.replica)
        if older:
            task = asyncio.create_task(self._end(older))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, (Unavailable, Conflict)):  # the store away or busy: the
            log.warning("ending a replaced session failed: %s", error)  # recheck tries again
        else:
            log.error("ending a replaced session failed", exc_info=error)

    async def _end(self, sessions: list[LiveSession]) -> int:
        """Counts the replacement of one device's sessions and ends them."""
        device_id = sessions[0].device_id
        if device_id in self._ending:
            return 0  # the other check is counting it
        self._ending.add(device_id)
        try:
            counted = await asyncio.to_thread(
                self.store.count_replacement, device_id, self.hub.clock()
            )
        except NotFound:  # deleted meanwhile: the recheck of credentials ends its sessions
            return 0
        finally:
            self._ending.discard(device_id)
        open_still = [live for live in sessions if live.ending is None]
        self.hub.end_replaced(open_still, *counted)
        return len(open_still)
