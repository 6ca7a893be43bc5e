"""The store contract for the fleet's shared state: alerts from edge events, the webhook
outbox, leases, desired states, rollouts and models, on SQLite and on PostgreSQL (devices
and enrollment: test_store_contract.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import uuid

import pytest

from cloud.domain import (
    AlertEventRecord,
    AlertFilter,
    AlertState,
    DesiredModel,
    Gates,
    ModelRecord,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetState,
    Wave,
)
from cloud.store import Store, open_store, sql_alerts, sql_base
from cloud.store.sql import SqlStore
from cloud.webhook_records import Delivery
from edge_agent.errors import (
    Conflict,
    FailedPrecondition,
    InvalidInput,
    NotFound,
)
from tests.support.stores import (
    NOW,
    PostgresBackend,
    SqliteBackend,
    activate_cert,
    bound_parameters_at_most,
    issue_cert,
)


def _event(
    device_id: str,
    sequence: int,
    kind: str,
    score: float = 1.5,
    at: float = 0.0,
    asset: str = "pump-1",
    top: tuple[tuple[str, float], ...] = (("flow", 0.7),),
) -> AlertEventRecord:
    end = NOW + dt.timedelta(seconds=at)
    return AlertEventRecord(
        device_id=device_id,
        sequence=sequence,
        alert_key=f"{asset}:anomaly:{sequence}",
        kind=kind,
        asset=asset,
        fault="anomaly",
        score=score,
        top_sensors=list(top),
        window_start=end - dt.timedelta(seconds=24),
        window_end=end,
        raised_at=end,
        model_version="1",
    )


def _desired(device_id: str, version: str) -> DesiredModel:
    return DesiredModel(
        device_id=device_id,
        model_name="pump",
        model_version=version,
        manifest_digest="sha256:" + "a" * 64,
        signature_digest="sha256:" + "b" * 64,
        rollout_id="r-1",
        shadow=False,
        updated_at=NOW,
    )


def _rollout(device_id: str) -> tuple[RolloutRecord, RolloutTarget]:
    rollout = RolloutRecord(
        id=str(uuid.uuid4()),
        model_name="pump",
        model_version="2",
        selector="",
        state=RolloutState.RUNNING,
        waves=(Wave(index=0, size="100%", target=1),),
        current_wave=0,
        soak_s=0.0,
        gates=Gates(),
        reason="",
        created_at=NOW,
        updated_at=NOW,
    )
    target = RolloutTarget(
        rollout_id=rollout.id,
        device_id=device_id,
        wave=0,
        state=TargetState.WAITING,
        updated_at=NOW,
    )
    return rollout, target


def _claimed_again_after_its_lease(store: Store) -> tuple[Delivery, Delivery, dt.timedelta]:
    """One delivery claimed by replica A, then again by B once A's lease lapsed: (A's claim,
    B's claim, the lease)."""
    d = store.create_device("p", {}, "", NOW).id
    store.add_webhook("http://h/a", "secret-secret-secret", "", NOW)
    store.store_records(d, [], [_event(d, 1, "raised")], NOW)
    lease = dt.timedelta(seconds=30)
    (by_a,) = store.claim_deliveries(NOW, lease, 10)
    (by_b,) = store.claim_deliveries(NOW + 2 * lease, lease, 10)
    return by_a, by_b, lease


class FleetStateContract:
    """Subclasses provide the `store` fixture; every backend must pass all of this."""

    def test_edge_events_group_into_alerts_exactly_once(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        raised = _event(d, 1, "raised", score=1.2, at=0)
        again = _event(d, 3, "raised", score=2.5, at=30, top=(("vibration", 0.9),))
        other = _event(d, 2, "raised", score=1.1, at=5, asset="pump-2")
        counted = store.store_records(d, [], [raised, other], NOW)
        assert counted.alerts_changed == 2
        # A resent batch (the agent reconnected before its ack) changes nothing.
        assert store.store_records(d, [], [raised, other], NOW).alerts_changed == 0
        store.store_records(d, [], [again], NOW)
        alerts = store.list_alerts(AlertFilter(device_id=d))
        assert [a.asset for a in alerts] == ["pump-1", "pump-2"]  # most recently seen first
        first = alerts[0]
        assert first.state is AlertState.FIRING and first.raised_events == 2
        assert first.peak_score == 2.5 and first.top_sensors == (("vibration", 0.9),)
        assert first.first_seen == NOW and first.last_seen == NOW + dt.timedelta(seconds=30)
        # The edge clears pump-1 before anyone acknowledged it: returned to normal,
        # unacknowledged (ISA-18.2); a later raise opens a new alert.
        store.store_records(d, [], [_event(d, 4, "cleared", at=60)], NOW)
        resolved = store.get_alert(first.id)
        assert resolved.state is AlertState.RETURNED and resolved.resolved_by == "edge"
        assert resolved.resolved_at == NOW + dt.timedelta(seconds=60)
        store.store_records(d, [], [_event(d, 5, "raised", at=90)], NOW)
        firing = store.list_alerts(AlertFilter(state=AlertState.FIRING, device_id=d))
        assert sorted(a.asset for a in firing) == ["pump-1", "pump-2"]
        assert first.id not in {a.id for a in firing}

    def test_operator_lifecycle_and_revisions(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        start = store.alert_revision()
        store.store_records(d, [], [_event(d, 1, "raised", at=0)], NOW)
        (alert,) = store.alerts_after(start)
        acked = store.update_alert(alert.id, "ack", "on my way", "alice", NOW)
        assert acked.state is AlertState.ACKNOWLEDGED and acked.revision > alert.revision
        assert [(n.by, n.text) for n in acked.notes] == [("alice", "on my way")]
        # Still raised on the edge: folds into the acknowledged alert, no new one.
        store.store_records(d, [], [_event(d, 2, "raised", score=3.0, at=10)], NOW)
        assert store.get_alert(alert.id).state is AlertState.ACKNOWLEDGED
        done = store.update_alert(alert.id, "resolve", "bearing replaced", "bob", NOW)
        assert done.state is AlertState.RESOLVED and done.resolved_by == "bob"
        with pytest.raises(FailedPrecondition, match="resolved"):
            store.update_alert(alert.id, "ack", "", "carol", NOW)
        # The edge's clear after an operator resolved it changes nothing.
        assert store.store_records(d, [], [_event(d, 3, "cleared", at=20)], NOW).alerts_changed == 0
        changes = store.alerts_after(start)
        assert [a.id for a in changes] == [alert.id] and changes[0].revision == done.revision
        assert store.alert_revision() == done.revision
        assert store.alerts_after(done.revision) == []
        with pytest.raises(NotFound):
            store.update_alert("nope", "ack", "", "alice", NOW)
        with pytest.raises(InvalidInput, match="note"):
            store.update_alert(alert.id, "ack", "x" * 5000, "alice", NOW)

    def test_alerts_are_found_by_the_short_id_the_list_shows(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        d = store.create_device("p", {}, "", NOW).id
        events = [_event(d, i + 1, "raised", at=0, asset=f"pump-{i}") for i in range(40)]
        store.store_records(d, [], events, NOW)
        alerts = store.alerts_after(0)
        alert = alerts[0]
        assert store.get_alert(alert.id[:8]).id == alert.id
        acked = store.update_alert(alert.id[:8], "ack", "", "alice", NOW)
        assert acked.id == alert.id and acked.state is AlertState.ACKNOWLEDGED
        with pytest.raises(NotFound):
            store.get_alert("ffffffff-no-such")
        with pytest.raises(NotFound):
            store.get_alert("%")  # not an id, and not a pattern either
        # 40 random ids share a first character somewhere: with one-character prefixes
        # allowed, such a prefix is ambiguous and the error says so.
        monkeypatch.setattr(sql_alerts, "MIN_ID_PREFIX", 1)
        firsts = [a.id[0] for a in alerts]
        shared = next(c for c in firsts if firsts.count(c) > 1)
        with pytest.raises(InvalidInput, match="ambiguous"):
            store.get_alert(shared)

    def test_webhook_outbox_claims_in_order_with_leases(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        hook = store.add_webhook("http://h/x", "secret-secret-secret", "state=firing|returned", NOW)
        other = store.add_webhook("http://h/y", "secret-secret-secret", "asset=pump-9", NOW)
        store.store_records(d, [], [_event(d, 1, "raised", at=0)], NOW)
        store.store_records(d, [], [_event(d, 2, "cleared", at=30)], NOW)
        lease = dt.timedelta(seconds=30)
        (first,) = store.claim_deliveries(NOW, lease, 10)  # the resolve waits for the firing
        assert first.webhook_id == hook.id and first.payload["event"] == "alert.firing"
        assert first.attempts == 1 and first.secret == "secret-secret-secret"
        assert store.claim_deliveries(NOW, lease, 10) == []  # leased
        store.finish_delivery(first.id, "HTTP 503", NOW, NOW + dt.timedelta(seconds=5))
        assert store.claim_deliveries(NOW, lease, 10) == []  # not due yet
        (again,) = store.claim_deliveries(NOW + dt.timedelta(seconds=5), lease, 10)
        assert again.id == first.id and again.attempts == 2
        store.finish_delivery(first.id, "", NOW, None)
        (second,) = store.claim_deliveries(NOW + dt.timedelta(seconds=6), lease, 10)
        assert second.payload["event"] == "alert.returned"
        store.finish_delivery(second.id, "HTTP 500", NOW, None)  # out of attempts: dead
        listed = {h.id: h for h in store.list_webhooks()}
        assert (listed[hook.id].delivered, listed[hook.id].pending, listed[hook.id].dead) == (
            1,
            0,
            1,
        )
        assert listed[hook.id].last_error == "HTTP 500" and listed[other.id].pending == 0
        store.remove_webhook(hook.id)
        assert [h.id for h in store.list_webhooks()] == [other.id]
        with pytest.raises(NotFound):
            store.remove_webhook(hook.id)
        with pytest.raises(InvalidInput, match="unknown key"):
            store.add_webhook("http://h/z", "secret-secret-secret", "colour=red", NOW)

    def test_webhook_claims_take_only_each_webhooks_share(self, store: Store) -> None:
        """A sender holding some of a webhook's deliveries claims no more of it than its
        share: before, it claimed them, gave the extra back and each claim cost an attempt."""
        d = store.create_device("p", {}, "", NOW).id
        a = store.add_webhook("http://h/a", "secret-secret-secret", "", NOW).id
        b = store.add_webhook("http://h/b", "secret-secret-secret", "", NOW).id
        store.store_records(d, [], [_event(d, i, "raised", asset=f"p{i}") for i in range(6)], NOW)
        lease = dt.timedelta(seconds=30)
        got = store.claim_deliveries(NOW, lease, 10, per_webhook=3, busy={a: 1, "gone": 2})
        assert [x.webhook_id for x in got] == [a, b, a, b, b]  # oldest first, a's 2, b's 3
        assert all(x.attempts == 1 and x.leased_until == NOW + lease for x in got)
        assert store.claim_deliveries(NOW, lease, 10, per_webhook=3, busy={a: 3, b: 5}) == []
        (one,) = store.claim_deliveries(NOW, lease, 1, per_webhook=4, busy={a: 3, b: 3})
        assert one.webhook_id == a and one.id > max(x.id for x in got if x.webhook_id == a)
        rest = store.claim_deliveries(NOW, lease, 10, per_webhook=10)
        assert len(rest) == 12 - 6 and not {x.id for x in rest} & {x.id for x in [*got, one]}

    def test_a_late_failure_never_undoes_a_delivery(self, store: Store) -> None:
        """Replica A's lease lapses mid-send, B claims the delivery again and delivers it;
        A's failure arriving afterwards must not make the delivered delivery dead."""
        by_a, by_b, lease = _claimed_again_after_its_lease(store)
        assert by_b.id == by_a.id
        store.finish_delivery(by_b.id, "", NOW + 2 * lease, None)
        store.finish_delivery(by_a.id, "HTTP 500: late", NOW + 3 * lease, None)  # out of tries
        (listed,) = store.list_webhooks()
        assert (listed.delivered, listed.dead, listed.pending) == (1, 0, 0)
        assert listed.last_error == "", listed.last_error

    def test_a_lapsed_claims_failure_leaves_the_new_claim_alone(self, store: Store) -> None:
        """A's lease lapses, B claims again; A's failure (retry or its last attempt) must
        neither move B's lease (a third claim would then send it a third time) nor kill the
        delivery B is about to deliver."""
        by_a, by_b, lease = _claimed_again_after_its_lease(store)
        late = NOW + 2 * lease + dt.timedelta(seconds=1)
        store.finish_delivery(by_a.id, "HTTP 503", late, late, by_a.leased_until)
        assert store.claim_deliveries(late, lease, 10) == [], "B's claim was taken over"
        store.finish_delivery(by_a.id, "HTTP 500", late, None, by_a.leased_until)  # last try
        store.finish_delivery(by_b.id, "", late, None, by_b.leased_until)
        (listed,) = store.list_webhooks()
        assert (listed.delivered, listed.dead, listed.pending) == (1, 0, 0)

    def test_a_released_delivery_costs_no_attempt_and_keeps_its_error(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        hook = store.add_webhook("http://h/a", "secret-secret-secret", "", NOW).id
        store.store_records(d, [], [_event(d, 1, "raised")], NOW)
        lease = dt.timedelta(seconds=30)
        (first,) = store.claim_deliveries(NOW, lease, 10)
        store.finish_delivery(first.id, "HTTP 503: down", NOW, NOW + dt.timedelta(seconds=5))
        later = NOW + dt.timedelta(seconds=5)
        (claimed,) = store.claim_deliveries(later, lease, 10, per_webhook=8)
        assert claimed.attempts == 2 and claimed.leased_until is not None
        # Another claim's lease names another claim: nothing changes.
        assert not store.release_delivery(claimed.id, claimed.leased_until - lease, later)
        assert store.release_delivery(claimed.id, claimed.leased_until, later)
        assert not store.release_delivery(claimed.id, claimed.leased_until, later)  # over
        (listed,) = store.list_webhooks()
        assert listed.id == hook and listed.pending == 1 and listed.last_error == "HTTP 503: down"
        (again,) = store.claim_deliveries(later, lease, 10, per_webhook=8)
        assert again.id == first.id and again.attempts == 2  # the release did not count
        store.finish_delivery(again.id, "", later, None)
        assert not store.release_delivery(again.id, again.leased_until or NOW, later)
        (listed,) = store.list_webhooks()
        assert (listed.delivered, listed.pending) == (1, 0)

    def test_concurrent_webhook_claims_take_each_delivery_once(self, store: Store) -> None:
        d = store.create_device("p", {}, "", NOW).id
        store.add_webhook("http://h/a", "secret-secret-secret", "", NOW)
        store.add_webhook("http://h/b", "secret-secret-secret", "", NOW)
        store.store_records(d, [], [_event(d, i, "raised", asset=f"p{i}") for i in range(20)], NOW)
        claims: list[list[int]] = []
        barrier = threading.Barrier(4)

        def claim() -> None:
            barrier.wait()
            got = store.claim_deliveries(NOW, dt.timedelta(seconds=30), 8, per_webhook=3)
            claims.append([x.id for x in got])

        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ids = [i for got in claims for i in got]
        assert len(claims) == 4 and len(ids) == len(set(ids)), claims
        assert all(len(got) <= 6 for got in claims), claims

    def test_leases_have_one_holder_until_they_expire(self, store: Store) -> None:
        ttl = dt.timedelta(seconds=15)
        assert store.try_lease("ctl", "a", NOW, ttl).held_by("a", NOW)
        taken = store.try_lease("ctl", "b", NOW + dt.timedelta(seconds=5), ttl)
        assert taken.holder == "a" and not taken.held_by("b", NOW)
        renewed = store.try_lease("ctl", "a", NOW + dt.timedelta(seconds=10), ttl)
        assert renewed.expires_at == NOW + dt.timedelta(seconds=25)
        later = NOW + dt.timedelta(seconds=26)  # a stopped renewing: b takes over
        assert store.try_lease("ctl", "b", later, ttl).held_by("b", later)
        store.release_lease("ctl", "a", later)  # not a's any more: no effect
        lease = store.get_lease("ctl")
        assert lease is not None and lease.holder == "b"
        store.release_lease("ctl", "b", later)
        assert store.try_lease("ctl", "a", later, ttl).held_by("a", later)
        assert store.get_lease("other") is None

    def test_concurrent_lease_attempts_admit_one_holder(self, store: Store) -> None:
        holders: list[str] = []
        barrier = threading.Barrier(4)

        def attempt(name: str) -> None:
            barrier.wait()
            if store.try_lease("race", name, NOW, dt.timedelta(seconds=15)).held_by(name, NOW):
                holders.append(name)

        threads = [threading.Thread(target=attempt, args=(f"r{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(holders) == 1, holders

    def test_desired_states_form_a_change_feed(self, store: Store) -> None:
        a = store.create_device("pump-a", {}, "", NOW)
        b = store.create_device("pump-b", {}, "", NOW)
        start = store.desired_revision()
        assert store.desired_after(start) == []
        written = store.set_desired([_desired(a.id, "2"), _desired(b.id, "2")])
        assert [d.revision for d in written] == [start + 1, start + 2]
        assert store.get_desired(a.id) == written[0]
        again = store.set_desired([_desired(a.id, "3")])  # replaces a's: one entry per device
        assert again[0].revision == start + 3 == store.desired_revision()
        feed = store.desired_after(start)
        assert [(d.device_id, d.model_version, d.revision) for d in feed] == [
            (b.id, "2", start + 2),
            (a.id, "3", start + 3),
        ]
        assert store.desired_after(start + 2) == [again[0]]
        assert store.desired_after(start, limit=1) == [feed[0]]

    def test_desired_states_are_read_in_bulk_for_a_listing(self, store: Store) -> None:
        a, b, c = (store.create_device(f"pump-{n}", {}, "", NOW) for n in "abc")
        assert store.desired_for([]) == {} == store.desired_for([a.id, b.id])
        written = store.set_desired([_desired(a.id, "2"), _desired(b.id, "3")])
        # Past one slice of ids (500), unknown ids among them, a device without one.
        unknown = [str(uuid.uuid4()) for _ in range(600)]
        found = store.desired_for([*unknown[:300], b.id, c.id, *unknown[300:], a.id])
        assert found == {a.id: written[0], b.id: written[1]}
        assert store.desired_for([c.id]) == {}

    def test_rollouts_are_written_by_compare_and_set(self, store: Store) -> None:
        device = store.create_device("pump-a", {}, "", NOW)
        rollout, target = _rollout(device.id)
        store.create_rollout(rollout, [target])
        read_by_leader = store.get_rollout(rollout.id)
        read_by_operator = store.get_rollout(rollout.id)
        aborted, _ = store.save_rollout(
            dataclasses.replace(read_by_operator, state=RolloutState.ABORTED, reason="stop")
        )
        assert aborted.revision == read_by_operator.revision + 1
        # The leader decided on what it read before the abort: nothing of it is written,
        # neither the rollout, nor its targets, nor the desired state it meant to send.
        started = dataclasses.replace(target, state=TargetState.INSTALLING)
        with pytest.raises(Conflict):
            store.save_rollout(read_by_leader, [started], [_desired(device.id, "2")])
        assert store.get_rollout(rollout.id).state is RolloutState.ABORTED
        assert store.rollout_target(rollout.id, device.id) == dataclasses.replace(
            target, revision=0
        )
        assert store.get_desired(device.id) is None

    def test_two_replicas_creating_overlapping_rollouts_at_once_start_one(
        self, store: Store
    ) -> None:
        """Two control-plane replicas (two stores on one database) create rollouts over the
        same devices at the same moment: one starts, the other is refused by name."""
        assert isinstance(store, SqlStore)
        other = open_store(store.url)

        def create(
            replica: Store, ids: list[str], start: threading.Barrier, ended: list[object]
        ) -> None:
            rollout, _ = _rollout(ids[0])
            targets = [
                RolloutTarget(rollout.id, d, wave=0, state=TargetState.WAITING, updated_at=NOW)
                for d in ids
            ]
            start.wait()
            try:
                replica.create_rollout(rollout, targets)
                ended.append("created")
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                ended.append(exc)

        try:
            for round_ in range(10):
                ids = [store.create_device(f"r{round_}-{i}", {}, "", NOW).id for i in range(50)]
                start, ended = threading.Barrier(2, timeout=10), list[object]()
                threads = [
                    threading.Thread(target=create, args=(replica, ids, start, ended))
                    for replica in (store, other)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                assert ended.count("created") == 1, ended
                refused = [e for e in ended if e != "created"]
                assert isinstance(refused[0], FailedPrecondition), refused
                assert "active rollout" in str(refused[0])
        finally:
            other.close()

    def test_a_rollout_over_more_devices_than_one_in_list_takes_is_created(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The active-rollout check names the targets in IN lists of ID_CHUNK: a fleet past
        the database's bound parameters per statement (SQLite 32,766, psycopg 65,535), here
        made small, is one rollout, and a device in its last chunk is still found busy."""
        assert isinstance(store, SqlStore)
        ids = [store.create_device(f"p{i:02}", {}, "", NOW).id for i in range(50)]
        free = [store.create_device(f"q{i:02}", {}, "", NOW).id for i in range(20)]
        monkeypatch.setattr(sql_base, "ID_CHUNK", 8)
        if store.engine.dialect.name == "sqlite":
            bound_parameters_at_most(store, 20)  # a statement naming all 50 fails
        rollout, _ = _rollout(ids[0])
        targets = [
            RolloutTarget(rollout.id, d, wave=0, state=TargetState.WAITING, updated_at=NOW)
            for d in ids
        ]
        store.create_rollout(rollout, targets)
        assert {t.device_id for t in store.rollout_targets(rollout.id)} == set(ids)
        again, _ = _rollout(free[0])
        busy_last = [  # the busy one in the third chunk
            RolloutTarget(again.id, d, wave=0, state=TargetState.WAITING, updated_at=NOW)
            for d in [*free, ids[-1]]
        ]
        with pytest.raises(FailedPrecondition, match="'p49' is in active rollout"):
            store.create_rollout(again, busy_last)

    def test_shadow_reports_never_fail_the_leaders_compare_and_set(self, store: Store) -> None:
        device = store.create_device("pump-a", {}, "", NOW)
        rollout, target = _rollout(device.id)
        store.create_rollout(rollout, [target])
        read = store.rollout_target(rollout.id, device.id)
        assert read is not None
        store.record_shadow(rollout.id, device.id, {"windows": 40, "agreement": 0.99})
        stored = store.rollout_target(rollout.id, device.id)
        assert stored is not None and stored.shadow_windows == 40
        assert stored.revision == read.revision and stored.state is read.state
        store.save_rollout(rollout, [dataclasses.replace(read, state=TargetState.INSTALLING)])

    def test_targets_are_written_by_compare_and_set(self, store: Store) -> None:
        device = store.create_device("pump-a", {}, "", NOW)
        rollout, target = _rollout(device.id)
        store.create_rollout(rollout, [target])
        read = store.rollout_target(rollout.id, device.id)
        assert read is not None
        saved = store.save_target(dataclasses.replace(read, state=TargetState.UPDATED))
        assert saved.revision == read.revision + 1
        with pytest.raises(Conflict):
            store.save_target(dataclasses.replace(read, state=TargetState.FAILED))
        with pytest.raises(Conflict):  # the rollout's writer read the target before, too
            store.save_rollout(rollout, [dataclasses.replace(read, state=TargetState.FAILED)])
        stored = store.rollout_target(rollout.id, device.id)
        assert stored is not None and stored.state is TargetState.UPDATED

    def test_a_device_is_deleted_only_once_revoked_and_takes_its_data_along(
        self, store: Store
    ) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        store.enroll("h1", NOW, issue_cert, activate_cert)
        store.store_records(device.id, [], [_event(device.id, 1, "raised")], NOW)
        store.set_desired([_desired(device.id, "2")])
        with pytest.raises(FailedPrecondition, match="revoke it first"):
            store.delete_device("p")
        store.revoke_device("p", "decommissioned", NOW)
        deleted = store.delete_device("p")
        assert deleted.id == device.id
        with pytest.raises(NotFound):
            store.get_device(device.id)
        assert store.list_alerts(AlertFilter()) == []
        assert store.get_desired(device.id) is None
        assert store.last_record_sequence(device.id) == 0
        other = store.create_device("never-enrolled", {}, "", NOW)
        assert store.delete_device(other.id).name == "never-enrolled"

    def test_a_model_version_in_use_is_not_deleted(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        for version in ("1", "2"):
            store.add_model(
                ModelRecord("pump", version, f"sha256:{version * 64}", "sha256:" + "b" * 64, 1,
                            NOW, {})
            )  # fmt: skip
        store.set_desired([_desired(device.id, "2")])
        with pytest.raises(FailedPrecondition, match="desired version of 1 device"):
            store.delete_model("pump", "2")
        assert store.delete_model("pump", "1").version == "1"
        assert [m.version for m in store.list_models("pump")] == ["2"]
        with pytest.raises(NotFound):
            store.delete_model("pump", "1")


@pytest.mark.integration
class TestSqliteFleetState(SqliteBackend, FleetStateContract):
    pass


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresFleetState(PostgresBackend, FleetStateContract):
    pass
