"""One contract for every store backend: the same class runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.domain import (
    AlertEventRecord,
    AlertFilter,
    AlertState,
    DesiredModel,
    DeviceRecord,
    DeviceState,
    Gates,
    ModelRecord,
    PresenceUpdate,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetState,
    Wave,
)
from cloud.store import Store, open_store, sql_alerts
from edge_agent.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parent.parent


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


def _issue(device: DeviceRecord) -> str:
    return f"cert-for-{device.id}"


NOT_AFTER = NOW + dt.timedelta(days=365)


def _activate(cert: str) -> tuple[str, str, dt.datetime]:
    return "serial-1", "fp-" + cert[-6:], NOT_AFTER


class StoreContract:
    """Subclasses provide the `store` fixture; every backend must pass all of this."""

    def test_create_and_get_by_id_or_name(self, store: Store) -> None:
        created = store.create_device("pump-1", {"site": "a"}, "orin", NOW)
        assert created.state is DeviceState.PENDING
        assert store.get_device(created.id) == store.get_device("pump-1") == created
        assert created.created_at == NOW

    def test_duplicate_name_is_refused_and_nothing_lost(self, store: Store) -> None:
        first = store.create_device("pump-1", {"site": "a"}, "orin", NOW)
        with pytest.raises(AlreadyExists):
            store.create_device("pump-1", {"site": "b"}, "orin", NOW)
        assert store.get_device("pump-1") == first

    def test_unknown_device(self, store: Store) -> None:
        with pytest.raises(NotFound, match="nope"):
            store.get_device("nope")

    def test_list_filters_by_selector(self, store: Store) -> None:
        store.create_device("b", {"site": "a", "line": "2"}, "", NOW)
        store.create_device("a", {"site": "a", "line": "1"}, "", NOW)
        store.create_device("c", {"site": "b"}, "", NOW)
        assert [d.name for d in store.list_devices({})] == ["a", "b", "c"]
        assert [d.name for d in store.list_devices({"site": "a"})] == ["a", "b"]
        assert [d.name for d in store.list_devices({"site": "a", "line": "2"})] == ["b"]

    def test_labels_set_and_remove(self, store: Store) -> None:
        store.create_device("p", {"site": "a", "old": "x"}, "", NOW)
        updated = store.update_labels("p", {"line": "3"}, ["old"])
        assert updated.labels == {"site": "a", "line": "3"}
        assert store.get_device("p").labels == {"site": "a", "line": "3"}

    def test_enroll_consumes_token_once(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        enrolled, cert = store.enroll("h1", NOW, _issue, _activate)
        assert enrolled.state is DeviceState.ACTIVE and cert == f"cert-for-{device.id}"
        assert enrolled.cert_serial == "serial-1" and enrolled.enrolled_at == NOW
        with pytest.raises(Unauthenticated, match="used already"):
            store.enroll("h1", NOW, _issue, _activate)

    def test_enroll_refuses_unknown_and_expired_tokens(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(minutes=5))
        with pytest.raises(Unauthenticated, match="unknown"):
            store.enroll("other", NOW, _issue, _activate)
        with pytest.raises(Unauthenticated, match="expired"):
            store.enroll("h1", NOW + dt.timedelta(minutes=6), _issue, _activate)
        assert store.get_device("p").state is DeviceState.PENDING

    def test_failed_issue_leaves_token_usable(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))

        def refuse(_: DeviceRecord) -> str:
            raise PermissionDenied("CSR names someone else")

        with pytest.raises(PermissionDenied):
            store.enroll("h1", NOW, refuse, _activate)
        enrolled, _ = store.enroll("h1", NOW, _issue, _activate)
        assert enrolled.state is DeviceState.ACTIVE

    def test_new_token_replaces_the_old_one(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        store.add_enrollment_token(device.id, "h2", NOW, NOW + dt.timedelta(hours=1))
        with pytest.raises(Unauthenticated, match="replaced"):
            store.enroll("h1", NOW, _issue, _activate)
        store.enroll("h2", NOW, _issue, _activate)

    def test_concurrent_enrollments_with_one_token_admit_exactly_one(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        outcomes: list[str] = []
        barrier = threading.Barrier(4)

        def attempt() -> None:
            barrier.wait()
            try:
                store.enroll("h1", NOW, _issue, _activate)
                outcomes.append("ok")
            except Unauthenticated:
                outcomes.append("refused")

        threads = [threading.Thread(target=attempt) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]

    def test_revoke_is_idempotent_and_blocks_tokens(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        revoked = store.revoke_device("p", "stolen", NOW)
        assert revoked.state is DeviceState.REVOKED and revoked.revoked_reason == "stolen"
        again = store.revoke_device("p", "twice", NOW + dt.timedelta(minutes=1))
        assert again.revoked_at == NOW and again.revoked_reason == "stolen"
        with pytest.raises(Unauthenticated):
            store.enroll("h1", NOW, _issue, _activate)
        with pytest.raises(FailedPrecondition, match="revoked"):
            store.add_enrollment_token(device.id, "h2", NOW, NOW + dt.timedelta(hours=1))
        assert store.revoked_since(NOW) == [device.id]
        assert store.revoked_since(NOW + dt.timedelta(seconds=1)) == []

    def test_presence_updates_active_devices_only(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        pending = store.create_device("q", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        store.enroll("h1", NOW, _issue, _activate)
        later = NOW + dt.timedelta(seconds=30)
        store.record_presence(
            [
                PresenceUpdate(
                    device.id, later, True, "0.1.0", {"model_version": "3"}, {"arch": "x"}
                ),
                PresenceUpdate(pending.id, later, True),
                PresenceUpdate("no-such-device", later, True),
            ]
        )
        seen = store.get_device(device.id)
        assert (seen.last_seen, seen.session_open, seen.agent_version) == (later, True, "0.1.0")
        assert seen.status == {"model_version": "3"} and seen.host == {"arch": "x"}
        assert seen.is_online(later + dt.timedelta(seconds=5), dt.timedelta(seconds=30))
        assert not seen.is_online(later + dt.timedelta(minutes=5), dt.timedelta(seconds=30))
        assert store.get_device(pending.id).last_seen is None
        store.record_presence([PresenceUpdate(device.id, later, False)])
        assert store.get_device(device.id).status == {"model_version": "3"}
        assert not store.get_device(device.id).session_open

    def test_device_summaries_is_what_the_records_say(self, store: Store) -> None:
        """The fleet metrics' narrow read agrees with the whole records, device by device."""
        device = store.create_device("p", {"site": "a"}, "", NOW)
        store.create_device("o-pending", {}, "", NOW)
        quiet = store.create_device("q", {}, "", NOW)
        for d, token in ((device, "h1"), (quiet, "h2")):
            store.add_enrollment_token(d.id, token, NOW, NOW + dt.timedelta(hours=1))
            store.enroll(token, NOW, _issue, _activate)
        later = NOW + dt.timedelta(seconds=30)
        health = {"outbox_depth": 7, "drift": {"pump": {"input_shift": 1.5}}}
        store.record_presence(
            [
                PresenceUpdate(device.id, later, True, "0.1.0", {"health": health}),
                PresenceUpdate(quiet.id, later, False, "0.1.0", {"health": "not a mapping"}),
            ]
        )
        assert store.get_device("q").status["health"] == "not a mapping"  # stored as sent
        store.revoke_device("q", "stolen", later)
        presence = store.device_summaries()
        assert presence[1].labels == {"site": "a"}
        assert [p.name for p in presence] == ["o-pending", "p", "q"]
        for p, record in zip(presence, store.list_devices({}), strict=True):
            assert (p.id, p.name, p.labels, p.state, p.session_open, p.last_seen) == (
                record.id,
                record.name,
                record.labels,
                record.state,
                record.session_open,
                record.last_seen,
            )
            assert p.cert_not_after == record.cert_not_after
            for at in (later, later + dt.timedelta(minutes=5)):
                offline_after = dt.timedelta(seconds=60)
                assert p.is_online(at, offline_after) == record.is_online(at, offline_after)
        assert presence[1].health == health and presence[1].cert_not_after == NOT_AFTER
        assert presence[0].health == {} and presence[2].health == {}  # none; not a mapping
        assert presence[2].state is DeviceState.REVOKED

    def test_device_summaries_of_some_devices(self, store: Store) -> None:
        """Those asked for that exist, by name; more ids than one statement takes are read in
        chunks and still come back by name."""
        made = [store.create_device(f"d-{i:04d}", {}, "", NOW) for i in range(1100)]
        picked = [made[1050].id, made[3].id, "no-such-id", made[700].id]
        assert [d.name for d in store.device_summaries(picked)] == ["d-0003", "d-0700", "d-1050"]
        assert store.device_summaries([]) == []
        wide = store.device_summaries([d.id for d in reversed(made)])
        assert [d.name for d in wide] == [d.name for d in made]

    def test_operators(self, store: Store) -> None:
        op = store.add_operator("admin", "hash-a", NOW)
        assert store.operator_by_token_hash("hash-a") == op
        with pytest.raises(Unauthenticated):
            store.operator_by_token_hash("hash-b")
        with pytest.raises(AlreadyExists):
            store.add_operator("admin", "hash-c", NOW)

    # ---- alerts ----
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
        store.enroll("h1", NOW, _issue, _activate)
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

    def test_naive_datetimes_are_refused(self, store: Store) -> None:
        with pytest.raises(Exception, match="naive"):
            store.create_device("p", {}, "", dt.datetime(2026, 1, 1))
        with pytest.raises(NotFound):
            store.get_device("p")


@pytest.mark.integration
class TestSqliteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
        yield store
        store.close()

    def test_reopening_keeps_data_and_migrations_are_idempotent(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'again.db'}"
        first = open_store(url)
        first.create_device("p", {"k": "v"}, "", NOW)
        first.close()
        second = open_store(url)
        assert second.get_device("p").labels == {"k": "v"}
        second.close()


@pytest.mark.integration
@pytest.mark.postgres
class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[Store]:
        store = open_store(pg_url)
        yield store
        store.close()

    def test_stores_opened_together_on_an_empty_database_migrate_it_once(self, pg_url: str) -> None:
        """Replicas and `cloud serve --workers N` start together: every process opens the
        store, and each upgrade would run the same DDL (the later ones failing on what the
        first made) but for the advisory lock."""
        opening = "import sys; from cloud.store import open_store; open_store(sys.argv[1]).close()"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", opening, pg_url], stderr=subprocess.PIPE, cwd=ROOT
            )
            for _ in range(4)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()
        store = open_store(pg_url)
        store.create_device("p", {}, "", NOW)
        assert store.get_device("p").name == "p"
        store.close()


@pytest.mark.unit
def test_unsupported_database_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mysql"):
        open_store("mysql://x")
