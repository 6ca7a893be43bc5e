"""Session claims in the store, on SQLite and on PostgreSQL: each session opened takes the
device's next generation (never the same twice, however many replicas claim at once), a
replica finds the newest one and who opened it, and replacements are counted across
replicas so a device flapping between them is seen (`cloud.session_claims`)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session

from cloud.session_claims import (
    FLAP_FORGET_S,
    FLAP_REPLACEMENTS,
    FLAP_WINDOW_S,
    SessionClaim,
    replaced,
)
from cloud.store import Store, sql_base, sql_sessions
from cloud.store.tables import DeviceSessionRow
from edge_agent.errors import NotFound
from tests.support.stores import NOW, PostgresBackend, SqliteBackend

pytestmark = [pytest.mark.integration]


class SessionClaimContract:
    def test_each_session_takes_the_next_generation_and_names_its_replica(
        self, store: Store
    ) -> None:
        d = store.create_device("pump-a", {}, "", NOW).id
        first, none = store.claim_session(d, "r-1", "ipv4:10.0.0.1:1", 0.0, replacing=False)
        assert (first.generation, first.replica, first.peer, none) == (
            1,
            "r-1",
            "ipv4:10.0.0.1:1",
            None,
        )
        second, _ = store.claim_session(d, "r-2", "ipv4:10.0.0.2:2", 1.0, replacing=False)
        assert second.generation == 2
        assert store.newest_sessions([d, "no-such-device"]) == {d: (2, "r-2")}
        # The replica holding generation 1 finds it replaced, and counts it.
        claim, replacement = store.count_replacement(d, 2.0)
        assert (claim.generation, claim.replica, claim.peer) == (2, "r-2", "ipv4:10.0.0.2:2")
        assert not replacement.flapping and replacement.recent == 1

    def test_replacements_counted_on_any_replica_make_a_device_flap(self, store: Store) -> None:
        d = store.create_device("clone", {}, "", NOW).id
        store.claim_session(d, "r-1", "a", 0.0, replacing=False)
        verdicts = []
        for i in range(1, FLAP_REPLACEMENTS + 2):  # each new session on the other replica
            store.claim_session(d, f"r-{1 + i % 2}", "a" if i % 2 else "b", float(i), False)
            verdicts.append(store.count_replacement(d, float(i))[1])
        # One replaced on its own replica, counted as the new session is claimed.
        claim, local = store.claim_session(d, "r-1", "a", 10.0, replacing=True)
        assert local is not None
        assert [v.flapping for v in verdicts] == [False] * FLAP_REPLACEMENTS + [True]
        assert [v.started for v in verdicts] == [False] * FLAP_REPLACEMENTS + [True]
        assert local.flapping and not local.started  # once, fleet-wide
        assert claim.generation == FLAP_REPLACEMENTS + 3
        # Quiet for FLAP_FORGET_S: forgotten.
        _, later = store.claim_session(d, "r-2", "b", 10.0 + FLAP_FORGET_S + 1, replacing=True)
        assert later is not None and not later.flapping

    def test_claims_at_once_never_share_a_generation(self, store: Store) -> None:
        d = store.create_device("busy", {}, "", NOW).id
        taken: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def claim(replica: str) -> None:
            start.wait()
            try:
                for _ in range(5):
                    taken.append(store.claim_session(d, replica, "", 0.0, False)[0].generation)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(f"r-{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(taken) == list(range(1, 41)), sorted(taken)

    def test_a_deleted_device_has_no_claim(self, store: Store) -> None:
        d = store.create_device("gone", {}, "", NOW)
        store.claim_session(d.id, "r-1", "", 0.0, False)
        store.revoke_device(d.id, "scrapped", NOW)
        store.delete_device(d.id)
        assert store.newest_sessions([d.id]) == {}
        with pytest.raises(NotFound):
            store.count_replacement(d.id, 1.0)
        with pytest.raises(NotFound):
            store.claim_session(d.id, "r-1", "", 1.0, False)

    def test_a_device_deleted_while_its_claim_is_taken_is_not_found(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The claim row made (or found) and then gone before it is locked, as when the device
        is deleted between the two statements: NotFound naming the device."""
        d = store.create_device("gone", {}, "", NOW).id
        locked = sql_sessions._locked

        def deleted_meanwhile(s: Session, device_id: str, create: bool) -> DeviceSessionRow | None:
            row = locked(s, device_id, create)
            if row is not None:
                s.delete(row)  # what the device's delete cascades to
                s.flush()
            return locked(s, device_id, False)

        monkeypatch.setattr(sql_sessions, "_locked", deleted_meanwhile)
        with pytest.raises(NotFound, match=d):
            store.claim_session(d, "r-1", "", 0.0, False)

    def test_newest_sessions_of_more_devices_than_one_in_list(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ids = [store.create_device(f"d{i:02}", {}, "", NOW).id for i in range(11)]
        for i, d in enumerate(ids):
            for _ in range(i + 1):
                store.claim_session(d, "r-1", "", 0.0, False)
        monkeypatch.setattr(sql_base, "ID_CHUNK", 4)
        assert store.newest_sessions(ids) == {d: (i + 1, "r-1") for i, d in enumerate(ids)}


class TestSqliteSessionClaims(SqliteBackend, SessionClaimContract):
    pass


@pytest.mark.postgres
class TestPostgresSessionClaims(PostgresBackend, SessionClaimContract):
    pass


def test_the_replacement_history_stays_bounded() -> None:
    """A device replaced in a tight loop keeps FLAP_REPLACEMENTS + 1 times, not one each."""
    claim = SessionClaim("d1", 1)
    for i in range(1000):
        claim, replacement = replaced(claim, i * 0.01)
    assert len(claim.replaced_at) == FLAP_REPLACEMENTS + 1 and replacement.flapping
    claim, replacement = replaced(claim, 1000 * 0.01 + FLAP_WINDOW_S + FLAP_FORGET_S)
    assert claim.replaced_at == (claim.replaced_at[-1],) and not replacement.flapping
