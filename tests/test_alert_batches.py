"""Big batches of alert events, on SQLite and on PostgreSQL: a batch folds into alerts in a
few statements however many events it carries (the alert lock is held for those, not for a
few per event), and the folding keeps the per-event semantics (sequence order, a clear then
a raise of one group within the batch)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
from sqlalchemy import event

from cloud.domain import AlertFilter, AlertState
from cloud.store import Store, alert_fold, sql_alerts
from cloud.store.alert_fold import LIMIT_ASSET, LIMIT_FAULT
from cloud.store.sql import SqlStore
from cloud.webhook_records import Delivery
from tests.support.stores import NOW, PostgresBackend, SqliteBackend
from tests.test_store_contract_fleet import _event

LEASE = dt.timedelta(seconds=30)


class Statements:
    """The SQL statements a store sends while counting (an executemany counts once)."""

    def __init__(self, store: Store) -> None:
        assert isinstance(store, SqlStore)
        self.engine = store.engine
        self.sent: list[str] = []

    def _note(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(statement)

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._note)

    def matching(self, *words: str) -> list[str]:
        return [s for s in self.sent if all(w in " ".join(s.split()) for w in words)]


class AlertBatchContract:
    def test_a_batch_of_raises_folds_in_a_few_statements(self, store: Store) -> None:
        """Before, each event read its group's open alert, took a revision and flushed on its
        own under the fleet-wide alert lock: 5,000 raises held it for 17 s (PostgreSQL) and
        45 s (SQLite), and every other device's alert waited."""
        bad = store.create_device("bad", {}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        n = 200
        raises = [_event(bad, i + 1, "raised", asset=f"pump-{i}") for i in range(n)]
        before = store.alert_revision()
        with Statements(store) as sql:
            counted = store.store_records(bad, [], raises, NOW)
        assert counted.alerts_changed == n
        assert len(sql.sent) <= 40, f"{len(sql.sent)} statements for {n} raises"
        bumps = sql.matching("UPDATE alert_revision")
        assert len(bumps) == 1, f"{len(bumps)} updates of the revision counter for one batch"
        lookups = sql.matching("FROM alerts", "open_key IN")
        assert len(lookups) == 1, f"{len(lookups)} reads of open alerts for one batch"
        alerts = store.alerts_after(before, 1000)
        assert sorted(a.revision for a in alerts) == list(range(before + 1, before + n + 1))
        assert store.alert_revision() == before + n
        (hook,) = store.list_webhooks()
        assert hook.pending == n

    def test_a_batch_folds_as_its_events_would_one_by_one(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.store_records(d, [], [_event(d, 1, "raised", asset="pump-1", score=1.0)], NOW)
        (old,) = store.list_alerts(AlertFilter(device_id=d))
        batch = [  # out of order on the wire: folded in sequence order
            _event(d, 6, "raised", asset="pump-1", score=1.4, at=60),  # opens a new one
            _event(d, 2, "raised", asset="pump-1", score=2.0, at=10),  # into the open one
            _event(d, 4, "raised", asset="pump-2", score=1.1, at=20),
            _event(d, 3, "cleared", asset="pump-1", at=30),  # closes it
            _event(d, 5, "raised", asset="pump-2", score=3.0, at=40, top=(("v", 1.0),)),
            _event(d, 7, "cleared", asset="pump-9", at=70),  # nothing open: nothing
        ]
        assert store.store_records(d, [], batch, NOW).alerts_changed == 3
        closed = store.get_alert(old.id)
        assert closed.state is AlertState.RETURNED and closed.raised_events == 2
        assert closed.peak_score == 2.0 and closed.resolved_at == NOW + dt.timedelta(seconds=30)
        firing = {
            a.asset: a for a in store.list_alerts(AlertFilter(device_id=d, state=AlertState.FIRING))
        }
        assert sorted(firing) == ["pump-1", "pump-2"] and firing["pump-1"].id != old.id
        assert firing["pump-1"].peak_score == 1.4 and firing["pump-1"].raised_events == 1
        assert firing["pump-2"].raised_events == 2 and firing["pump-2"].peak_score == 3.0
        assert firing["pump-2"].top_sensors == (("v", 1.0),)
        # One revision each, in the order of their last change.
        order = sorted([closed, *firing.values()], key=lambda a: a.revision)
        assert [a.asset for a in order] == ["pump-1", "pump-2", "pump-1"]
        assert order[0].id == old.id

    def test_a_device_opens_at_most_max_open_alerts(
        self, store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Raises beyond the limit are stored and counted on one open-alert-limit alert of
        the device, which opens no more alerts (nor queues more deliveries) for them."""
        monkeypatch.setattr(alert_fold, "MAX_OPEN_ALERTS", 3)
        clock = [0.0]
        warnings = alert_fold.LimitWarnings(lambda: clock[0])
        monkeypatch.setattr(sql_alerts, "_limit_warnings", warnings)
        d = store.create_device("flood", {}, "", NOW).id
        other = store.create_device("other", {}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        assets = ["pump-0", "pump-1", "pump-2", "pump-3", "pump-4", "pump-5", "pump-4"]
        raises = [_event(d, i + 1, "raised", asset=a, score=1 + i) for i, a in enumerate(assets)]
        with caplog.at_level(logging.WARNING, "cloud.store.alert_fold"):
            counted = store.store_records(d, [], raises, NOW)
        assert (counted.stored, counted.alerts_changed) == (7, 4)
        assert len(store.list_alert_events(d)) == 7, "every raise is stored"
        by_asset = {a.asset: a for a in store.list_alerts(AlertFilter(device_id=d))}
        assert sorted(by_asset) == [LIMIT_ASSET, "pump-0", "pump-1", "pump-2"]
        limit = by_asset[LIMIT_ASSET]
        assert (limit.fault, limit.state, limit.raised_events) == (
            LIMIT_FAULT, AlertState.FIRING, 4,
        )  # fmt: skip
        assert limit.peak_score == 7.0 and "3 open alerts, the most allowed" in limit.notes[0].text
        assert store.list_webhooks()[0].pending == 4
        (line,) = [r.getMessage() for r in caplog.records]
        assert "4 raise(s) opened no alert" in line and d in line
        # Another device is not limited by this one.
        assert store.store_records(other, [], [_event(other, 1, "raised")], NOW).alerts_changed
        # One of the device's alerts closes: the next raise opens its own alert again.
        back = [_event(d, 8, "cleared", asset="pump-0"), _event(d, 9, "raised", asset="pump-3")]
        store.store_records(d, [], back, NOW)
        assert store.get_alert(limit.id).raised_events == 4
        firing = store.list_alerts(AlertFilter(device_id=d, state=AlertState.FIRING))
        assert sorted(a.asset for a in firing) == [LIMIT_ASSET, "pump-1", "pump-2", "pump-3"]
        # At the limit again: counted on the same limit alert; within a minute of the last
        # warning no line, then one counting what came since.
        caplog.clear()
        with caplog.at_level(logging.WARNING, "cloud.store.alert_fold"):
            clock[0] = alert_fold.LIMIT_WARN_EVERY_S - 1
            store.store_records(d, [], [_event(d, 10, "raised", asset="pump-6")], NOW)
            assert store.get_alert(limit.id).raised_events == 5 and not caplog.records
            clock[0] = alert_fold.LIMIT_WARN_EVERY_S
            store.store_records(d, [], [_event(d, 11, "raised", asset="pump-6")], NOW)
        (line,) = [r.getMessage() for r in caplog.records]
        assert "2 raise(s) opened no alert" in line, line
        # The operator resolves it: the next raise beyond the limit opens a new one.
        store.update_alert(limit.id, "resolve", "", "alice", NOW)
        store.store_records(d, [], [_event(d, 12, "raised", asset="pump-7")], NOW)
        firing = store.list_alerts(AlertFilter(device_id=d, state=AlertState.FIRING))
        (again,) = [a for a in firing if a.asset == LIMIT_ASSET]
        assert again.asset == LIMIT_ASSET and again.id != limit.id and again.raised_events == 1

    def test_claims_take_each_devices_first_delivery_before_anyones_second(
        self, store: Store
    ) -> None:
        """Before, claims went strictly oldest first: a device's backlog of 5,000 changes
        was sent before any other device's alert queued after it."""
        bad = store.create_device("bad", {}, "", NOW).id
        good = store.create_device("good", {}, "", NOW).id
        a = store.add_webhook("http://example.com/a", "s", "", NOW).id
        b = store.add_webhook("http://example.com/b", "s", "", NOW).id
        store.store_records(
            bad, [], [_event(bad, i + 1, "raised", asset=f"p{i}") for i in range(30)], NOW
        )
        store.store_records(bad, [], [_event(bad, 31, "cleared", asset="p0")], NOW)
        store.store_records(good, [], [_event(good, 1, "raised")], NOW)

        def who(claimed: list[Delivery]) -> list[tuple[str, str]]:
            names = {bad: "bad", good: "good", a: "a", b: "b"}
            return [(names[d.payload["alert"]["device_id"]], names[d.webhook_id]) for d in claimed]

        first = store.claim_deliveries(NOW, LEASE, 4, per_webhook=24)
        assert who(first) == [("bad", "a"), ("bad", "b"), ("good", "a"), ("good", "b")]
        store.store_records(good, [], [_event(good, 2, "raised", asset="pump-2")], NOW)
        second = store.claim_deliveries(NOW, LEASE, 4)  # no shares: the same turns
        assert who(second) == [("bad", "a"), ("bad", "b"), ("good", "a"), ("good", "b")]
        # Per alert, changes still go in order: p0's close waits for its opening.
        rest = store.claim_deliveries(NOW, LEASE, 1000, per_webhook=1000)
        assert len(rest) == 2 * 28 and all(d.payload["event"] == "alert.firing" for d in rest)
        for d in first:
            store.finish_delivery(d.id, "", NOW, None)
        closes = store.claim_deliveries(NOW, LEASE, 1000)
        assert [(d.payload["event"], d.payload["alert"]["asset"]) for d in closes] == [
            ("alert.returned", "p0")
        ] * 2


class TestSqliteAlertBatches(SqliteBackend, AlertBatchContract):
    pass


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresAlertBatches(PostgresBackend, AlertBatchContract):
    pass
