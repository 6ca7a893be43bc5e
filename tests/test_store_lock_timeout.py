"""A PostgreSQL session that holds a lock and stops (a replica frozen inside a transaction)
must not stall the other replicas: their waits for it give up with Unavailable after the
lock timeout, and the server ends the stopped session once it idles in its transaction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from cloud.store import sql_base
from cloud.store.sql import SqlStore
from edge_agent.errors import Unavailable
from tests.support.agents import wait_for
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _settings(store: SqlStore, *names: str) -> dict[str, str]:
    with store._tx() as s:
        return {n: str(s.execute(text(f"SHOW {n}")).scalar()) for n in names}


@pytest.fixture
def held_device(pg_url: str) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """A device whose row another connection holds locked, in a transaction it leaves open
    (as a stopped process would); rolled back at the end."""
    store = SqlStore(pg_url)
    device = store.create_device("p", {}, "", NOW).id
    store.close()
    holder = psycopg.connect(pg_url)
    holder.execute("SELECT id FROM devices WHERE id = %s FOR UPDATE", (device,))
    try:
        yield device, holder
    finally:
        holder.rollback()
        holder.close()


def test_a_held_lock_makes_the_other_session_fail_fast_with_unavailable(
    pg_url: str, held_device: tuple[str, psycopg.Connection[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the label change waited for the holder as long as it held on (hours for a
    frozen replica), its connection taken from the pool meanwhile."""
    monkeypatch.setattr(sql_base, "PG_LOCK_TIMEOUT_MS", 200)
    device, holder = held_device
    store = SqlStore(pg_url)
    outcome: list[BaseException | str] = []
    answered = threading.Event()

    def relabel() -> None:
        try:
            store.update_labels(device, {"a": "1"}, [])
            outcome.append("stored")
        except BaseException as exc:  # noqa: BLE001 - what the caller got, for the assertion
            outcome.append(exc)
        answered.set()

    threading.Thread(target=relabel, daemon=True).start()
    waited = answered.wait(60)
    holder.rollback()  # the old code's waiter goes on from here, so the thread ends either way
    answered.wait(60)
    assert waited, f"the label change still waited for the held row after 60 s: {outcome}"
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
    assert "lock timeout" in str(outcome[0]) and "another connection" in str(outcome[0])
    assert store.update_labels(device, {"a": "1"}, []).labels == {"a": "1"}  # once let go
    store.close()


def test_the_sessions_start_with_lock_and_idle_timeouts(pg_url: str) -> None:
    store = SqlStore(pg_url)
    got = _settings(store, "lock_timeout", "idle_in_transaction_session_timeout")
    assert got == {"lock_timeout": "5s", "idle_in_transaction_session_timeout": "1min"}, got
    with store.engine.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert params.get("keepalives_idle") == "10", params
    store.close()


def test_the_urls_own_options_win(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options in the URL come after the store's and override them; the rest stay."""
    monkeypatch.delenv("PGOPTIONS", raising=False)
    url = f"{pg_url}?options=-c%20lock_timeout%3D250%20-c%20statement_timeout%3D7000"
    store = SqlStore(url + "&keepalives_idle=30")
    names = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
    got = _settings(store, *names)
    assert got == {
        "lock_timeout": "250ms",
        "statement_timeout": "7s",
        "idle_in_transaction_session_timeout": "1min",
    }, got
    with store.engine.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert params.get("keepalives_idle") == "30", params
    store.close()
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=300")  # libpq's own, where the URL has none
    store = SqlStore(pg_url)
    assert _settings(store, "lock_timeout") == {"lock_timeout": "300ms"}
    store.close()


def test_a_session_left_idle_in_its_transaction_is_ended_and_its_locks_go(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frozen replica's side: the server ends its session; the waiter then gets the row
    (waiting up to 30 s here, for that); the frozen one, woken, is told Unavailable."""
    setup = SqlStore(pg_url)  # migrated with the 60 s
    device = setup.create_device("p", {}, "", NOW).id
    setup.close()
    monkeypatch.setattr(sql_base, "PG_IDLE_IN_TRANSACTION_MS", 300)
    frozen = SqlStore(pg_url, run_migrations=False)
    other = SqlStore(f"{pg_url}?options=-c%20lock_timeout%3D30000")
    with pytest.raises(Unavailable), frozen._tx() as s:
        frozen._device_row(s, device, for_update=True)
        pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
        assert other.update_labels(device, {"b": "2"}, []).labels == {"b": "2"}
        wait_for(lambda: not _alive(other, pid), timeout=60)
        s.execute(text("SELECT 1"))
    assert frozen.get_device(device).labels == {"b": "2"}  # the pool's next connection works
    frozen.close()
    other.close()


def _alive(store: SqlStore, pid: Any) -> bool:
    with store._tx() as s:
        found = s.execute(text("SELECT 1 FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
        return found.first() is not None


def test_the_session_settings_go_only_to_psycopg_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq's parameters only for the psycopg driver; `AUTOGLM_PG_SESSION_SETTINGS=off`
    leaves out the `options` startup parameter a pooler such as PgBouncer refuses (the
    keepalives are the client's own and stay)."""
    from cloud.store.sql_base import PG_SESSION_SETTINGS_ENV, pg_connect_args

    monkeypatch.delenv(PG_SESSION_SETTINGS_ENV, raising=False)
    assert "TimeZone=UTC" in pg_connect_args("postgresql+psycopg://u@h/db")["options"]
    assert pg_connect_args("postgresql+pg8000://u@h/db") == {}
    monkeypatch.setenv(PG_SESSION_SETTINGS_ENV, "off")
    args = pg_connect_args("postgresql+psycopg://u@h/db")
    assert "options" not in args and args["keepalives"] == "1", args
