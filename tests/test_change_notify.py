"""Wake-ups across replicas on PostgreSQL (LISTEN/NOTIFY): a committed desired-state change
or revocation is heard by a listener at once; a listener whose connection is killed comes
back and says that anything may have changed. (The two-replica test runs the control
planes with a desired-state poll too slow to matter, so devices there are reached through
these wake-ups.)"""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from cloud.domain import DesiredModel
from cloud.store import open_store
from cloud.store.notify import ANY, DESIRED, DEVICES
from tests.support.agents import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.postgres]
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def test_committed_changes_wake_a_listener_and_it_survives_a_lost_connection(
    pg_url: str,
) -> None:
    store = open_store(pg_url)
    heard: list[str] = []
    listener = store.change_listener(heard.append)
    assert listener is not None
    listener.start()
    try:
        wait_for(listener.listening.is_set, timeout=30)
        wait_for(lambda: heard == [ANY], timeout=30)
        device = store.create_device("edge-1", {"site": "a"}, "", T0)
        assert heard == [ANY]  # nothing that a follower waits for
        store.set_desired([DesiredModel(device.id, "pump", "2", "", "", "", False, T0)])
        wait_for(lambda: DESIRED in heard, timeout=30)
        store.revoke_device(device.id, "stolen", T0)
        wait_for(lambda: DEVICES in heard, timeout=30)

        # The server drops the listener's connection: it reconnects and says ANY again.
        with psycopg.connect("postgresql://" + pg_url.split("://", 1)[1]) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            ).fetchall()
        assert killed, "the listener's connection was not found"
        wait_for(lambda: heard.count(ANY) == 2, timeout=60)
        other = store.create_device("edge-2", {"site": "a"}, "", T0)
        store.set_desired([DesiredModel(other.id, "pump", "3", "", "", "", False, T0)])
        wait_for(lambda: heard.count(DESIRED) == 2, timeout=30)
    finally:
        listener.stop()
        store.close()


def test_sqlite_has_no_listener(tmp_path: object) -> None:
    store = open_store(f"sqlite:///{tmp_path}/cloud.db")
    try:
        assert store.change_listener(lambda _: None) is None
    finally:
        store.close()
