"""The sweep that releases alerts from ended shelvings and maintenance windows, on SQLite and
PostgreSQL: a sweep that releases nothing takes no lock however many alerts are held back;
one that releases some locks only those; closed alerts are never held back by a window; and
the replicas' senders sweep once per interval for the fleet, not once each."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from cloud.domain import AlertFilter, AlertRecord, AlertState
from cloud.store import Store, open_store
from cloud.store.tables import AlertRow
from cloud.webhooks import SenderSettings, WebhookSender
from tests.support.stores import NOW, PostgresBackend, SqliteBackend
from tests.test_alert_batches import Statements
from tests.test_store_contract_fleet import _event

HOUR = dt.timedelta(hours=1)


def _held(store: Store, device_id: str, n: int) -> None:
    raises = [_event(device_id, i + 1, "raised", asset=f"p{i}") for i in range(n)]
    store.store_records(device_id, [], raises, NOW)


class SweepContract:
    def test_a_sweep_that_releases_nothing_takes_no_lock(self, store: Store) -> None:
        """Before, every replica's sweep (every 5 s) took the fleet-wide alert lock whenever
        any alert was held back, and re-read each one locked: with 2,000 held back under an
        open-ended window, a device's batch carrying one alert event waited up to 4.9 s."""
        a = store.create_device("a", {"site": "a"}, "", NOW).id
        store.add_maintenance("site=a", "", NOW - HOUR, None, "out of service", "op", NOW)
        _held(store, a, 30)
        assert all(x.suppressed_by for x in store.list_alerts(AlertFilter(), 100))
        with Statements(store) as sql:
            assert store.release_suppressed(NOW + HOUR) == []
        locking = [
            s for s in sql.sent if "alert_revision" in s or "FOR UPDATE" in s or "IMMEDIATE" in s
        ]
        assert locking == [], f"a sweep releasing nothing locked ({len(locking)}): {locking[:2]}"

    def test_a_sweep_locks_and_revises_only_what_it_releases(self, store: Store) -> None:
        x = store.create_device("x", {"site": "x"}, "", NOW).id
        y = store.create_device("y", {"site": "y"}, "", NOW).id
        store.add_maintenance("site=x", "", NOW - HOUR, NOW + HOUR, "seals", "op", NOW)
        store.add_maintenance("site=y", "", NOW - HOUR, None, "retired", "op", NOW)
        _held(store, x, 3)
        _held(store, y, 20)
        before = store.alert_revision()
        with Statements(store) as sql:
            released = store.release_suppressed(NOW + HOUR)
        assert sorted((r.device_id, r.suppressed_by) for r in released) == [(x, "")] * 3
        reads = sql.matching("FROM alerts")
        assert len(reads) <= 3, f"{len(reads)} reads of alerts to release 3 of 23"
        assert store.alert_revision() == before + 3
        assert store.release_suppressed(NOW + HOUR) == []  # released once

    def test_a_closed_alerts_hold_mark_from_an_older_version_goes_at_once(
        self, store: Store
    ) -> None:
        """Closed alerts used to keep a window's mark, and with it their place among the
        alerts every sweep re-read locked, for as long as the window lasted."""
        a = store.create_device("a", {"site": "a"}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        store.add_maintenance("site=a", "", NOW - HOUR, None, "out of service", "op", NOW)
        _held(store, a, 1)
        store.store_records(a, [], [_event(a, 2, "cleared", asset="p0")], NOW)
        (closed,) = store.list_alerts(AlertFilter())
        assert closed.state is AlertState.RETURNED and closed.suppressed_by == ""
        with store._tx() as s:  # type: ignore[attr-defined]  # as versions before left it
            row = s.get(AlertRow, closed.id)
            row.doc = {**row.doc, "suppressed_by": "maintenance 12345678"}
        (cleared,) = store.release_suppressed(NOW)
        assert cleared.id == closed.id and cleared.suppressed_by == ""
        assert store.release_suppressed(NOW) == []
        assert store.claim_deliveries(NOW, dt.timedelta(seconds=30), 10) == []  # nothing news


class TestSqliteSweep(SqliteBackend, SweepContract):
    pass


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresSweep(PostgresBackend, SweepContract):
    pass


class CountingStore:
    """A store that counts the sweeps (`release_suppressed`) made through it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sweeps = 0

    def release_suppressed(self, now: dt.datetime) -> list[AlertRecord]:
        self.sweeps += 1
        return self.store.release_suppressed(now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_replicas_sweep_once_per_interval_for_the_fleet(tmp_path: Path) -> None:
    """Before, each replica's sender swept every `sweep_s`: three replicas, three sweeps."""
    store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
    settings = SenderSettings(sweep_s=2.0)  # the lease lasts two: 4 s
    a, b = CountingStore(store), CountingStore(store)
    first = WebhookSender(a, settings)  # type: ignore[arg-type]
    second = WebhookSender(b, settings)  # type: ignore[arg-type]

    async def run() -> None:
        await first.sweep()
        await second.sweep()
        assert (a.sweeps, b.sweeps) == (1, 0), "the second replica swept beside the first"
        second.wake(sweep=True)  # windows changed through it: at once, lease or not
        await second.sweep()
        assert b.sweeps == 1, "windows changed through the second replica: no sweep there"
        await second.sweep()
        assert b.sweeps == 1, "one wake, one sweep at once"
        # The first replica stops sweeping: its lease lapses and the second takes over.
        started = time.monotonic()
        while b.sweeps < 2:
            assert time.monotonic() - started < 60, "the second replica never took over"
            await asyncio.sleep(0.1)
            await second.sweep()
        took = time.monotonic() - started
        assert took >= settings.sweep_s, f"taken over after {took:.1f} s, before the lapse"
        await first.sweep()  # back, its interval long over: the lease is the second's now
        assert a.sweeps == 1, "the first replica swept beside the one holding the lease"

    try:
        asyncio.run(run())
    finally:
        store.close()
