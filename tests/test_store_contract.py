"""One contract for every store backend: the same class runs on SQLite and on PostgreSQL.
Devices, enrollment, presence and operators here; the fleet's shared state (alerts,
webhook outbox, leases, desired states, rollouts, models) in test_store_contract_fleet.py."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cloud.domain import (
    DeviceRecord,
    DeviceState,
    PresenceUpdate,
)
from cloud.store import Store, open_store
from edge_agent.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tests.support.stores import (
    NOT_AFTER,
    NOW,
    PostgresBackend,
    SqliteBackend,
    activate_cert,
    issue_cert,
)

ROOT = Path(__file__).resolve().parent.parent


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
        enrolled, cert = store.enroll("h1", NOW, issue_cert, activate_cert)
        assert enrolled.state is DeviceState.ACTIVE and cert == f"cert-for-{device.id}"
        assert enrolled.cert_serial == "serial-1" and enrolled.enrolled_at == NOW
        with pytest.raises(Unauthenticated, match="used already"):
            store.enroll("h1", NOW, issue_cert, activate_cert)

    def test_enroll_refuses_unknown_and_expired_tokens(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(minutes=5))
        with pytest.raises(Unauthenticated, match="unknown"):
            store.enroll("other", NOW, issue_cert, activate_cert)
        with pytest.raises(Unauthenticated, match="expired"):
            store.enroll("h1", NOW + dt.timedelta(minutes=6), issue_cert, activate_cert)
        assert store.get_device("p").state is DeviceState.PENDING

    def test_failed_issue_leaves_token_usable(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))

        def refuse(_: DeviceRecord) -> str:
            raise PermissionDenied("CSR names someone else")

        with pytest.raises(PermissionDenied):
            store.enroll("h1", NOW, refuse, activate_cert)
        enrolled, _ = store.enroll("h1", NOW, issue_cert, activate_cert)
        assert enrolled.state is DeviceState.ACTIVE

    def test_new_token_replaces_the_old_one(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        store.add_enrollment_token(device.id, "h2", NOW, NOW + dt.timedelta(hours=1))
        with pytest.raises(Unauthenticated, match="replaced"):
            store.enroll("h1", NOW, issue_cert, activate_cert)
        store.enroll("h2", NOW, issue_cert, activate_cert)

    def test_concurrent_enrollments_with_one_token_admit_exactly_one(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        outcomes: list[str] = []
        barrier = threading.Barrier(4)

        def attempt() -> None:
            barrier.wait()
            try:
                store.enroll("h1", NOW, issue_cert, activate_cert)
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
            store.enroll("h1", NOW, issue_cert, activate_cert)
        with pytest.raises(FailedPrecondition, match="revoked"):
            store.add_enrollment_token(device.id, "h2", NOW, NOW + dt.timedelta(hours=1))
        assert store.revoked_since(NOW) == [device.id]
        assert store.revoked_since(NOW + dt.timedelta(seconds=1)) == []

    def test_presence_updates_active_devices_only(self, store: Store) -> None:
        device = store.create_device("p", {}, "", NOW)
        pending = store.create_device("q", {}, "", NOW)
        store.add_enrollment_token(device.id, "h1", NOW, NOW + dt.timedelta(hours=1))
        store.enroll("h1", NOW, issue_cert, activate_cert)
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
            store.enroll(token, NOW, issue_cert, activate_cert)
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

    def test_concurrent_read_modify_writes_of_one_row_lose_nothing(self, store: Store) -> None:
        """Label changes read the row, merge and write it back: two threads doing that to one
        device at once must each see the other's writes (SQLite too, where a read starts no
        transaction and FOR UPDATE is ignored unless every transaction takes the lock)."""
        store.create_device("p", {}, "", NOW)
        start = threading.Barrier(2, timeout=10)
        errors: list[BaseException] = []

        def add_labels(thread: int) -> None:
            try:
                start.wait()
                for i in range(40):
                    store.update_labels("p", {f"t{thread}-{i}": "x"}, [])
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)

        threads = [threading.Thread(target=add_labels, args=(t,)) for t in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        expected = {f"t{t}-{i}" for t in (1, 2) for i in range(40)}
        assert set(store.get_device("p").labels) == expected

    def test_two_admins_revoking_each_other_at_once_leave_one(self, store: Store) -> None:
        """Each round the two active admins are revoked at once: one revocation must be
        refused as the last admin's, whichever runs first (not a deadlock, not two)."""

        def revoke(name: str, start: threading.Barrier, ended: dict[str, Exception]) -> None:
            start.wait()
            try:
                store.revoke_operator(name, NOW)
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                ended[name] = exc

        survivor = store.add_operator("admin-0", "hash-0", NOW).name
        for round_ in range(1, 11):
            new = store.add_operator(f"admin-{round_}", f"hash-{round_}", NOW).name
            start, refused = threading.Barrier(2, timeout=10), dict[str, Exception]()
            threads = [
                threading.Thread(target=revoke, args=(n, start, refused)) for n in (survivor, new)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(refused) == 1, refused
            assert all(isinstance(e, FailedPrecondition) for e in refused.values()), refused
            active = [o.name for o in store.list_operators() if o.revoked_at is None]
            assert active == list(refused)
            survivor = active[0]

    # ---- alerts ----
    def test_naive_datetimes_are_refused(self, store: Store) -> None:
        with pytest.raises(Exception, match="naive"):
            store.create_device("p", {}, "", dt.datetime(2026, 1, 1))
        with pytest.raises(NotFound):
            store.get_device("p")


@pytest.mark.integration
class TestSqliteStore(SqliteBackend, StoreContract):
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
class TestPostgresStore(PostgresBackend, StoreContract):
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
