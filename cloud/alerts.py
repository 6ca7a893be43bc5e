"""Following alert changes: the store's revision counter is the cursor, so a watcher misses
nothing between polls and sees changes made by any control-plane replica. Changes made in
this process wake watchers at once; others are picked up within `poll_s`.

One poll of the store serves every watcher of the process: a shared task reads the changes
after its cursor and hands each batch to every subscriber, so a thousand open watch streams
cost one query a second, not a thousand. A watcher that starts from an older revision reads
up to the shared cursor itself first; one that falls more than `max_backlog` batches behind
(its reader stopped reading) is dropped from the fan-out and reads from the store again on
its own, so no watcher holds unbounded memory and none misses a change."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from cloud.domain import AlertFilter, AlertRecord
from cloud.store.base import AlertStore
from edge_agent.errors import RateLimited
from edge_agent.waits import event_or_timeout

BATCH = 500
MAX_BACKLOG = 20  # batches a watcher may have waiting before it reads the store on its own


@dataclass(eq=False)
class _Subscriber:
    """One watcher's place in the fan-out: batches after `start`, or the poll's error."""

    start: int
    batches: asyncio.Queue[list[AlertRecord] | BaseException | None] = field(
        default_factory=asyncio.Queue
    )


class AlertFeed:
    def __init__(
        self, store: AlertStore, poll_s: float = 1.0, max_backlog: int = MAX_BACKLOG
    ) -> None:
        self.store = store
        self.poll_s = poll_s
        self.max_backlog = max_backlog
        self.listeners: list[Callable[[], None]] = []  # e.g. the webhook sender's wake
        self._subscribers: set[_Subscriber] = set()
        self._head = 0  # the shared poll's cursor: every change up to it has been handed out
        self._poller: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._wake = asyncio.Event()
        self._held: Counter[str] = Counter()  # watch streams open per holder (an operator)

    def notify(self) -> None:
        """Something changed (call on the event loop)."""
        self._wake.set()
        for listener in self.listeners:
            listener()

    @property
    def watchers(self) -> int:
        """Watchers served by the shared poll now."""
        return len(self._subscribers)

    @contextlib.contextmanager
    def watching(self, holder: str, limit: int, what: str) -> Iterator[None]:
        """One of `holder`'s watch streams, for as long as the block runs; RateLimited at
        once when `holder` has `limit` open already (`what` names the limit)."""
        if self._held[holder] >= limit:
            raise RateLimited(
                f"{holder} has {self._held[holder]} alert watch streams open, the most "
                f"allowed ({what} = {limit}); close one (another tab or `alerts watch`) first"
            )
        self._held[holder] += 1
        try:
            yield
        finally:
            self._held[holder] -= 1
            if not self._held[holder]:
                del self._held[holder]

    async def follow(
        self, where: AlertFilter, after: int | None = None
    ) -> AsyncIterator[AlertRecord]:
        """Alerts matching `where` as they change, from revision `after` (default: now)."""
        cursor = after if after is not None else await asyncio.to_thread(self.store.alert_revision)
        while True:
            subscriber = await self._subscribe()
            try:
                # Up to where the shared poll started handing out to this watcher: read here.
                while cursor < subscriber.start:
                    changed = await asyncio.to_thread(self.store.alerts_after, cursor, BATCH)
                    for alert in changed:
                        if alert.revision > subscriber.start:
                            break  # from here on the shared poll hands it over
                        cursor = alert.revision
                        if where.matches(alert):
                            yield alert
                    else:
                        if len(changed) == BATCH:
                            continue
                    cursor = max(cursor, subscriber.start)
                # Then the shared poll's batches, until this watcher falls too far behind.
                while (batch := await subscriber.batches.get()) is not None:
                    if isinstance(batch, BaseException):
                        raise batch
                    for alert in batch:
                        if alert.revision > cursor:
                            cursor = alert.revision
                            if where.matches(alert):
                                yield alert
            finally:
                self._unsubscribe(subscriber)

    async def _subscribe(self) -> _Subscriber:
        async with self._starting:
            if self._poller is None or self._poller.done():
                self._head = await asyncio.to_thread(self.store.alert_revision)
                self._poller = asyncio.create_task(self._poll(), name="alert-feed-poll")
            # One step of the loop: every batch handed out from now on is after `_head`.
            subscriber = _Subscriber(self._head)
            self._subscribers.add(subscriber)
            return subscriber

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers and self._poller is not None:
            self._poller.cancel()  # nobody watches: no polling
            self._poller = None

    async def _poll(self) -> None:
        """The shared poll: changes after `_head`, to every subscriber, while any is left."""
        while self._subscribers:
            self._wake.clear()
            try:
                changed = await asyncio.to_thread(self.store.alerts_after, self._head, BATCH)
            except Exception as exc:  # noqa: BLE001 - every watcher's stream ends with it
                for subscriber in self._subscribers:
                    subscriber.batches.put_nowait(exc)
                self._subscribers.clear()
                return
            if changed:
                self._head = max(self._head, changed[-1].revision)
                for subscriber in list(self._subscribers):
                    self._hand(subscriber, changed)
            if len(changed) == BATCH:
                continue  # more waiting
            await event_or_timeout(self._wake, self.poll_s)

    def _hand(self, subscriber: _Subscriber, batch: list[AlertRecord]) -> None:
        if subscriber.batches.qsize() >= self.max_backlog:
            # Its reader is not reading: it goes back to the store from its own cursor.
            self._subscribers.discard(subscriber)
            subscriber.batches.put_nowait(None)
            return
        subscriber.batches.put_nowait(batch)
