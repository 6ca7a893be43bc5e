"""The alert feed over an in-memory store: one shared poll serves every watcher, each sees
every change once and in order (from now, or from an older revision), a watcher that stops
reading holds bounded memory and catches up from the store, a store failure ends every
stream, and watch streams per holder are capped."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from cloud import alerts as feed_module
from cloud.alerts import AlertFeed
from cloud.domain import AlertFilter, AlertRecord, AlertState
from edge_agent.errors import RateLimited, Unavailable

pytestmark = pytest.mark.unit
T = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


class MemoryAlerts:
    """alerts_after and alert_revision as the SQL store answers them, counted."""

    def __init__(self) -> None:
        self.rows: dict[str, AlertRecord] = {}
        self.revision = 0
        self.polls = 0
        self.failing: Exception | None = None

    def change(self, alert_id: str, asset: str = "pump-1") -> int:
        self.revision += 1
        self.rows[alert_id] = AlertRecord(
            id=alert_id, device_id="d1", asset=asset, fault="anomaly", state=AlertState.FIRING,
            peak_score=1.5, top_sensors=(), first_seen=T, last_seen=T, resolved_at=None,
            resolved_by="", notes=(), model_version="1", raised_events=1, revision=self.revision,
        )  # fmt: skip
        return self.revision

    def alerts_after(self, revision: int, limit: int = 500) -> list[AlertRecord]:
        self.polls += 1
        if self.failing is not None:
            raise self.failing
        after = sorted((a for a in self.rows.values() if a.revision > revision), key=_rev)
        return after[:limit]

    def alert_revision(self) -> int:
        return self.revision


def _rev(alert: AlertRecord) -> int:
    return alert.revision


async def _take(stream: AsyncIterator[AlertRecord], count: int) -> list[tuple[str, int]]:
    out = []
    while len(out) < count:
        alert = await asyncio.wait_for(anext(stream), 20)
        out.append((alert.id, alert.revision))
    return out


def test_many_watchers_share_one_poll_and_each_sees_every_change_in_order() -> None:
    store = MemoryAlerts()
    feed = AlertFeed(store, poll_s=0.02)  # type: ignore[arg-type]

    async def run() -> tuple[list[list[tuple[str, int]]], int, int]:
        streams = [feed.follow(AlertFilter(), after=0) for _ in range(200)]
        readers = [asyncio.create_task(_take(s, 3)) for s in streams]
        await asyncio.sleep(0.1)  # every watcher waits on the shared poll
        polls_before = store.polls
        await asyncio.sleep(0.5)  # ~25 poll periods
        idle_polls = store.polls - polls_before
        for alert_id in ("a", "b", "a"):
            store.change(alert_id)
            feed.notify()
            await asyncio.sleep(0.01)
        seen = await asyncio.gather(*readers)
        watchers = feed.watchers
        for s in streams:
            await s.aclose()
        return seen, idle_polls, watchers

    seen, idle_polls, watchers = asyncio.run(run())
    # One poll a period for all 200 (each polling on its own made ~5,000 in that time).
    assert idle_polls <= 60, idle_polls
    assert watchers == 200
    for one in seen:
        revisions = [r for _, r in one]
        assert revisions == sorted(revisions) and len(set(revisions)) == 3, one
        assert {i for i, _ in one} == {"a", "b"}
    assert feed.watchers == 0


def test_a_watcher_from_an_older_revision_catches_up_once_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_module, "BATCH", 3)  # the catch-up reads several pages
    store = MemoryAlerts()
    for i in range(10):
        store.change(f"old-{i}")
    feed = AlertFeed(store, poll_s=0.02)  # type: ignore[arg-type]

    async def run() -> list[tuple[str, int]]:
        live = feed.follow(AlertFilter())  # from now: starts the shared poll at revision 10
        first = asyncio.create_task(_take(live, 1))
        await asyncio.sleep(0.05)
        store.change("new-0")
        store.change("old-3")  # changed again: seen once, at its newest revision
        feed.notify()
        await first
        late = feed.follow(AlertFilter(), after=4)
        got = await _take(late, 8)  # old-4..9 less old-3's move, then new-0, old-3
        store.change("new-1")
        feed.notify()
        got += await _take(late, 1)
        await live.aclose()
        await late.aclose()
        return got

    got = asyncio.run(run())
    revisions = [r for _, r in got]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions), got
    assert [i for i, _ in got] == [
        "old-4", "old-5", "old-6", "old-7", "old-8", "old-9", "new-0", "old-3", "new-1"
    ]  # fmt: skip


def test_a_watcher_that_stops_reading_holds_bounded_memory_and_misses_nothing() -> None:
    store = MemoryAlerts()
    feed = AlertFeed(store, poll_s=0.01, max_backlog=2)  # type: ignore[arg-type]

    async def run() -> tuple[list[tuple[str, int]], int]:
        slow = feed.follow(AlertFilter(), after=0)
        busy = feed.follow(AlertFilter(), after=0)
        busy_reader = asyncio.create_task(_take(busy, 30))
        store.change("x-0")
        feed.notify()
        got = await _take(slow, 1)  # subscribed; now it stops reading
        largest = 0
        for i in range(1, 30):
            store.change(f"x-{i}")
            feed.notify()
            await asyncio.sleep(0.005)  # a batch each
            largest = max([largest, *(s.batches.qsize() for s in feed._subscribers)])
        await busy_reader
        got += await _take(slow, 29)
        await slow.aclose()
        await busy.aclose()
        return got, largest

    got, largest = asyncio.run(run())
    assert largest <= 2, largest
    assert [i for i, _ in got] == [f"x-{i}" for i in range(30)]


def test_a_store_failure_ends_every_watch_and_a_new_watch_polls_again() -> None:
    store = MemoryAlerts()
    feed = AlertFeed(store, poll_s=0.01)  # type: ignore[arg-type]

    async def run() -> tuple[list[BaseException], list[tuple[str, int]]]:
        streams = [feed.follow(AlertFilter(), after=0) for _ in range(3)]
        readers = [asyncio.create_task(_take(s, 1)) for s in streams]
        await asyncio.sleep(0.05)
        store.failing = Unavailable("the database is down")
        outcomes = await asyncio.gather(*readers, return_exceptions=True)
        store.failing = None
        again = feed.follow(AlertFilter())
        reader = asyncio.create_task(_take(again, 1))
        await asyncio.sleep(0.05)
        store.change("after")
        feed.notify()
        got = await reader
        await again.aclose()
        return [o for o in outcomes if isinstance(o, BaseException)], got

    errors, got = asyncio.run(run())
    assert len(errors) == 3 and all(isinstance(e, Unavailable) for e in errors), errors
    assert got == [("after", 1)]


def test_watch_streams_are_capped_per_holder() -> None:
    feed = AlertFeed(MemoryAlerts())  # type: ignore[arg-type]
    with feed.watching("ann", 2, "MAX_X"), feed.watching("ann", 2, "MAX_X"):
        with pytest.raises(RateLimited, match=r"ann has 2 alert watch streams open.*MAX_X = 2"):
            feed.watching("ann", 2, "MAX_X").__enter__()
        with feed.watching("bob", 2, "MAX_X"):  # another holder is not affected
            pass
    with feed.watching("ann", 2, "MAX_X"):  # closed ones free their place
        pass
