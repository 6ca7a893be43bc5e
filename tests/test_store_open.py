"""Opening a store says what failed: a database it cannot reach, one another connection holds
locked, a migration the database refuses (which one, the database's message, nothing
changed), a schema from a newer plane; and a SQLite file system that refuses WAL is named."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cloud.store import open_store, sql_base
from cloud.store.sql_base import make_engine, migrate
from edge_agent.errors import FailedPrecondition, Unavailable
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration]


class Backend:
    url: str

    def sql(self, statement: str) -> list[tuple[object, ...]]:
        engine = make_engine(self.url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement))
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend()
    if request.param == "postgres":
        b.url = request.getfixturevalue("pg_url")
    else:
        b.url = f"sqlite:///{tmp_path / 'autoglm.db'}"
    yield b


def test_a_migration_the_database_refuses_is_named_with_its_message_and_changes_nothing(
    backend: Backend,
) -> None:
    engine = make_engine(backend.url)
    migrate(engine, "0013")
    engine.dispose()
    store = open_store(backend.url, run_migrations=False)
    device = store.create_device("pump-a", {"site": "a"}, "", NOW)
    store.close()
    # Someone added 0014's column by hand: its ALTER TABLE fails the same way every time.
    backend.sql("ALTER TABLE window_captures ADD COLUMN calibration TEXT")
    with pytest.raises(FailedPrecondition) as raised:
        open_store(backend.url)
    message = str(raised.value)
    assert "migration 0014 (0014_capture_calibration.py) failed" in message, message
    assert "calibration" in message and ("duplicate column" in message or "exists" in message)
    assert "cannot open" not in message and "rolled back" in message, message
    assert backend.sql("SELECT version_num FROM alembic_version") == [("0013",)]
    assert backend.sql("SELECT name FROM devices") == [("pump-a",)], device


def test_a_schema_from_a_newer_plane_is_named(backend: Backend) -> None:
    open_store(backend.url).close()
    backend.sql("UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(FailedPrecondition, match=r"0999.*newer control plane"):
        open_store(backend.url)


def test_a_sqlite_database_locked_by_another_connection_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "autoglm.db"
    open_store(f"sqlite:///{path}").close()
    monkeypatch.setattr(sql_base, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, past the busy timeout
    try:
        with pytest.raises(Unavailable) as raised:
            open_store(f"sqlite:///{path}")
    finally:
        holder.close()
    message = str(raised.value)
    assert "locked by another connection" in message and "0.2 s" in message, message
    assert "database is locked" in message and "cannot open" not in message, message
    open_store(f"sqlite:///{path}").close()  # once it lets go


def test_an_unreachable_database_cannot_be_opened() -> None:
    with pytest.raises(Unavailable, match=r"cannot open the database .*nobody:\*\*\*@"):
        open_store("postgresql://nobody:secret@127.0.0.1:1/none")


def test_a_sqlite_file_system_that_refuses_wal_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite answers PRAGMA journal_mode=WAL with the mode it is in; a VFS without shared
    memory (as a network mount) keeps 'delete'. The store works, and says so once."""
    caplog.set_level(logging.WARNING, "cloud.store")
    store = open_store(f"sqlite:///file:{tmp_path / 'autoglm.db'}?vfs=unix-dotfile&uri=true")
    try:
        store.create_device("pump-a", {}, "", NOW)
        with store._tx() as s:  # a second connection of the pool
            with store._read_tx() as r:
                assert r.execute(text("SELECT count(*) FROM devices")).scalar() == 1
            s.execute(text("SELECT 1"))
    finally:
        store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "journal mode 'delete', not WAL" in warnings[0] and "autoglm.db" in warnings[0]
    caplog.clear()
    open_store(f"sqlite:///{tmp_path / 'other.db'}").close()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
