"""Following alert changes: the store's revision counter is the cursor, so a watcher misses
nothing between polls and sees changes made by any control-plane replica. Changes made in
this process wake watchers at once; others are picked up within `poll_s`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from cloud.domain import AlertFilter, AlertRecord
from cloud.store.base import AlertStore

BATCH = 500


class AlertFeed:
    def __init__(self, store: AlertStore, poll_s: float = 1.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self._waiters: set[asyncio.Event] = set()
        self.listeners: list[Callable[[], None]] = []  # e.g. the webhook sender's wake

    def notify(self) -> None:
        """Something changed (call on the event loop)."""
        for event in self._waiters:
            event.set()
        for listener in self.listeners:
            listener()

    async def follow(
        self, where: AlertFilter, after: int | None = None
    ) -> AsyncIterator[AlertRecord]:
        """Alerts matching `where` as they change, from revision `after` (default: now)."""
        cursor = after if after is not None else await asyncio.to_thread(self.store.alert_revision)
        wake = asyncio.Event()
        self._waiters.add(wake)
        try:
            while True:
                wake.clear()
                changed = await asyncio.to_thread(self.store.alerts_after, cursor, BATCH)
                for alert in changed:
                    cursor = max(cursor, alert.revision)
                    if where.matches(alert):
                        yield alert
                if len(changed) == BATCH:
                    continue  # more waiting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.poll_s)
        finally:
            self._waiters.discard(wake)
