"""Alarm practice in the store, on SQLite and on PostgreSQL: ISA-18.2 states, verdicts,
shelving and maintenance windows holding deliveries back and releasing them on time (the
clock is the test's), Alertmanager repeats and webhook secret rotation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.domain import AlertFilter, AlertState
from cloud.store import Store, open_store
from cloud.webhook_records import Delivery
from edge_agent.errors import FailedPrecondition, InvalidInput
from tests.support.stores import NOW
from tests.test_store_contract_fleet import _event

LEASE = dt.timedelta(seconds=30)


def _send_all(store: Store, now: dt.datetime) -> list[Delivery]:
    """Claims every due delivery and marks it delivered, as a sender would."""
    sent = []
    while due := store.claim_deliveries(now, LEASE, 100):
        for d in due:
            store.finish_delivery(d.id, "", now, None)
        sent += due
    return sent


def _events(sent: list[Delivery]) -> list[tuple[str, str]]:
    return [(d.payload["alert"]["asset"], d.payload["event"]) for d in sent]


class AlarmContract:
    def test_isa_states_returned_unacknowledged_then_closed_by_an_ack(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.store_records(d, [], [_event(d, 1, "raised", at=0)], NOW)
        store.store_records(d, [], [_event(d, 2, "cleared", at=30)], NOW)
        (returned,) = store.list_alerts(AlertFilter(device_id=d))
        assert returned.state is AlertState.RETURNED and returned.resolved_by == "edge"
        closed = store.update_alert(returned.id, "ack", "seen it", "alice", NOW)
        assert closed.state is AlertState.RESOLVED and closed.acknowledged_by == "alice"
        assert closed.resolved_by == "edge"  # it was the edge that cleared it
        # Acknowledged first, then cleared by the edge: resolved.
        store.store_records(d, [], [_event(d, 3, "raised", at=60)], NOW)
        (firing,) = store.list_alerts(AlertFilter(state=AlertState.FIRING, device_id=d))
        store.update_alert(firing.id, "ack", "", "bob", NOW)
        store.store_records(d, [], [_event(d, 4, "cleared", at=90)], NOW)
        assert store.get_alert(firing.id).state is AlertState.RESOLVED

    def test_verdicts_are_stored_filtered_and_may_come_late(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        events = [_event(d, i + 1, "raised", asset=f"pump-{i}") for i in range(3)]
        store.store_records(d, [], events, NOW)
        a, b, c = sorted(store.list_alerts(AlertFilter(device_id=d)), key=lambda x: x.asset)
        real = store.update_alert(a.id, "resolve", "", "alice", NOW, "true", "bearing wear")
        assert (real.verdict, real.fault_type) == ("true", "bearing wear")
        store.update_alert(b.id, "ack", "", "alice", NOW, "false")
        # The edge-cleared alert gets its verdict after it closed: recorded, state kept.
        store.store_records(d, [], [_event(d, 9, "cleared", asset="pump-2")], NOW)
        store.update_alert(c.id, "ack", "", "bob", NOW)
        late = store.update_alert(c.id, "resolve", "inspected", "bob", NOW, "unsure")
        assert late.state is AlertState.RESOLVED and late.verdict == "unsure"
        by_verdict = {
            v: sorted(x.asset for x in store.list_alerts(AlertFilter(device_id=d, verdict=v)))
            for v in ("true", "false", "unsure", "")
        }
        assert by_verdict == {"true": ["pump-0"], "false": ["pump-1"], "unsure": ["pump-2"],
                              "": []}  # fmt: skip
        with pytest.raises(InvalidInput, match="'maybe' is not one of"):
            store.update_alert(a.id, "resolve", "", "alice", NOW, "maybe")
        with pytest.raises(InvalidInput, match="goes with a --verdict"):
            store.update_alert(b.id, "resolve", "", "alice", NOW, "", "cavitation")
        with pytest.raises(FailedPrecondition, match="resolved"):
            store.update_alert(a.id, "ack", "", "alice", NOW)  # closed, and no verdict

    def test_shelving_holds_deliveries_back_until_it_ends(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        store.store_records(d, [], [_event(d, 1, "raised", at=0)], NOW)
        assert _events(_send_all(store, NOW)) == [("pump-1", "alert.firing")]
        (alert,) = store.list_alerts(AlertFilter(device_id=d))
        until = NOW + dt.timedelta(hours=8)
        shelved = store.shelve_alert(alert.id, until, "pump on test bench", "alice", NOW)
        assert shelved.shelved_until == until and shelved.suppressed_by == "shelved"
        # Still raising on the edge: stored and kept current, not delivered.
        store.store_records(d, [], [_event(d, 2, "raised", score=3.0, at=30)], NOW)
        assert store.get_alert(alert.id).peak_score == 3.0
        assert _send_all(store, NOW) == []
        assert store.release_suppressed(until - dt.timedelta(seconds=1)) == []
        (released,) = store.release_suppressed(until)  # on time, by the test's clock
        assert released.shelved_until is None and released.suppressed_by == ""
        sent = _send_all(store, until)
        assert _events(sent) == [("pump-1", "alert.firing")]
        assert sent[0].payload["alert"]["peak_score"] == 3.0
        assert store.release_suppressed(until) == []  # released once
        with pytest.raises(InvalidInput, match="reason"):
            store.shelve_alert(alert.id, until, " ", "alice", NOW)

    def test_a_shelved_alert_that_clears_is_delivered_closed_and_unshelved_quietly(
        self, store: Store
    ) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        store.store_records(d, [], [_event(d, 1, "raised", at=0)], NOW)
        (alert,) = store.list_alerts(AlertFilter(device_id=d))
        _send_all(store, NOW)
        store.shelve_alert(alert.id, NOW + dt.timedelta(hours=1), "known", "alice", NOW)
        # Its close is delivered: the receiver heard of it opening.
        store.store_records(d, [], [_event(d, 2, "cleared", at=30)], NOW)
        assert _events(_send_all(store, NOW)) == [("pump-1", "alert.returned")]
        unshelved = store.unshelve_alert(alert.id, "alice", NOW)
        assert unshelved.shelved_until is None and _send_all(store, NOW) == []
        with pytest.raises(FailedPrecondition, match="not shelved"):
            store.unshelve_alert(alert.id, "alice", NOW)

    def test_maintenance_windows_hold_back_matching_devices_and_assets(self, store: Store) -> None:
        a = store.create_device("a", {"site": "a", "line": "2"}, "", NOW).id
        b = store.create_device("b", {"site": "b"}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        end = NOW + dt.timedelta(hours=2)
        window = store.add_maintenance("site=a,line=2", "pump-1", NOW, end, "seal swap", "op", NOW)
        outage = store.add_maintenance("site=b", "", NOW, None, "decommissioned", "op", NOW)
        two = [_event(a, 1, "raised"), _event(a, 2, "raised", asset="pump-2")]
        store.store_records(a, [], two, NOW)
        store.store_records(b, [], [_event(b, 1, "raised")], NOW)
        assert _events(_send_all(store, NOW)) == [("pump-2", "alert.firing")]
        held = {x.device_id + x.asset: x.suppressed_by for x in store.list_alerts(AlertFilter())}
        assert held == {a + "pump-1": window.label, a + "pump-2": "", b + "pump-1": outage.label}
        assert store.list_maintenance(NOW, False) == [window, outage]
        assert store.release_suppressed(end - dt.timedelta(seconds=1)) == []
        (released,) = store.release_suppressed(end)
        assert (released.device_id, released.asset) == (a, "pump-1")
        assert _events(_send_all(store, end)) == [("pump-1", "alert.firing")]
        # Out of service until removed.
        later = end + dt.timedelta(days=30)
        assert store.release_suppressed(later) == []
        assert store.list_maintenance(later, False) == [outage]
        assert store.list_maintenance(later, True) == [window, outage]
        store.remove_maintenance(outage.id[:8])
        (back,) = store.release_suppressed(later)
        assert back.device_id == b and _events(_send_all(store, later)) == [
            ("pump-1", "alert.firing")
        ]

    def test_alertmanager_deliveries_repeat_while_the_alert_is_open(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.add_webhook("http://am:9093", "", "", NOW, kind="alertmanager")
        store.add_webhook("http://example.com/h", "s", "", NOW)
        two = [_event(d, 1, "raised"), _event(d, 2, "raised", asset="pump-2")]
        store.store_records(d, [], two, NOW)
        assert len(_send_all(store, NOW)) == 4
        later = NOW + dt.timedelta(minutes=5)
        assert store.rearm_deliveries("alertmanager", NOW, later) == 0  # sent at NOW: recent
        (pump2,) = [a for a in store.list_alerts(AlertFilter()) if a.asset == "pump-2"]
        store.shelve_alert(pump2.id, later + dt.timedelta(hours=1), "test", "op", later)
        assert store.rearm_deliveries("alertmanager", later, later) == 1  # not the shelved one
        (again,) = _send_all(store, later)
        assert again.kind == "alertmanager" and again.payload["alert"]["asset"] == "pump-1"
        store.store_records(d, [], [_event(d, 3, "cleared")], later)
        _send_all(store, later)
        assert store.rearm_deliveries("alertmanager", later + LEASE, later + LEASE) == 0

    def test_a_rotated_secret_keeps_the_previous_one_until_it_expires(self, store: Store) -> None:
        hook = store.add_webhook("http://example.com/h", "old", "", NOW)
        until = NOW + dt.timedelta(days=1)
        rotated = store.rotate_webhook_secret(hook.id, "new", until)
        assert (rotated.secret, rotated.previous_secret, rotated.previous_until) == (
            "new", "old", until,
        )  # fmt: skip
        d = store.create_device("p", {}, "", NOW).id
        store.store_records(d, [], [_event(d, 1, "raised")], NOW)
        (claimed,) = store.claim_deliveries(NOW, LEASE, 10)
        assert (claimed.secret, claimed.previous_secret) == ("new", "old")

    def test_delivered_changes_of_closed_alerts_are_pruned(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        two = [_event(d, 1, "raised"), _event(d, 2, "raised", asset="pump-2")]
        store.store_records(d, [], two, NOW)
        store.store_records(d, [], [_event(d, 3, "cleared")], NOW)  # pump-1 returned
        assert len(_send_all(store, NOW)) == 3
        later = NOW + dt.timedelta(days=31)
        assert store.prune_deliveries(NOW) == 0  # none older than that
        assert store.prune_deliveries(later) == 2  # pump-1's two; pump-2 is still open
        assert store.list_webhooks()[0].delivered == 1  # the open alert's change is kept

    def test_windows_are_judged_at_the_edge_time_and_follow_relabelling(self, store: Store) -> None:
        a = store.create_device("a", {"site": "a"}, "", NOW).id
        store.add_webhook("http://example.com/h", "s", "", NOW)
        store.add_maintenance("site=a", "", NOW, NOW + dt.timedelta(hours=1), "seals", "op", NOW)
        later = NOW + dt.timedelta(hours=2)  # the device was offline; its backlog syncs now
        inside = [_event(a, 1, "raised", at=600), _event(a, 2, "cleared", at=900)]
        store.store_records(a, [], inside, later)  # raised and cleared inside the window
        still = [_event(a, 3, "raised", at=1200, asset="pump-2")]
        store.store_records(a, [], still, later)  # raised inside, still active after it
        assert _send_all(store, later) == []  # as the site saw them: held back
        # Closed unseen: nothing of it is delivered, and no window marks it held back.
        assert {x.asset: x.suppressed_by for x in store.list_alerts(AlertFilter())} == {
            "pump-1": "", "pump-2": store.list_maintenance(later, True)[0].label
        }  # fmt: skip
        released = store.release_suppressed(later)  # the window is over: pump-2 is news
        assert [(r.asset, r.state.active) for r in released] == [("pump-2", True)]
        assert _events(_send_all(store, later)) == [("pump-2", "alert.firing")]
        # Out of service, then the device is relabelled out of the selector: released.
        store.add_maintenance("site=a", "", later, None, "retired", "op", later)
        store.store_records(a, [], [_event(a, 4, "raised", at=7300, asset="pump-3")], later)
        assert store.release_suppressed(later) == []
        store.update_labels(a, {"site": "b"}, [])
        (moved,) = store.release_suppressed(later)
        assert moved.asset == "pump-3"


class TestSqliteAlarms(AlarmContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
        yield store
        store.close()


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresAlarms(AlarmContract):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[Store]:
        store = open_store(pg_url)
        yield store
        store.close()


def test_alerts_opened_before_the_upgrade_deliver_their_close(tmp_path: Path) -> None:
    from cloud.store.tables import AlertRow

    store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
    try:
        d = store.create_device("p", {}, "", NOW).id
        store.store_records(d, [], [_event(d, 1, "raised")], NOW)
        (alert,) = store.list_alerts(AlertFilter())
        with store._tx() as s:  # as 0010 left it: no "announced" flag
            row = s.get(AlertRow, alert.id)
            assert row is not None
            row.doc = {k: v for k, v in row.doc.items() if k != "announced"}
        store.add_webhook("http://example.com/h", "s", "", NOW)
        store.store_records(d, [], [_event(d, 2, "cleared")], NOW)
        assert _events(_send_all(store, NOW)) == [("pump-1", "alert.returned")]
    finally:
        store.close()
