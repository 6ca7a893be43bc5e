"""The store backends the store contract runs on (tests/test_store_contract*.py), and what
its tests share: a clock reading and the certificate callbacks of an enrollment."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from cloud.domain import DeviceRecord
from cloud.store import Store, open_store
from cloud.store.sql import SqlStore

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
NOT_AFTER = NOW + dt.timedelta(days=365)


def issue_cert(device: DeviceRecord) -> str:
    return f"cert-for-{device.id}"


def activate_cert(cert: str) -> tuple[str, str, dt.datetime]:
    return "serial-1", "fp-" + cert[-6:], NOT_AFTER


class SqliteBackend:
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
        yield store
        store.close()


class PostgresBackend:
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[Store]:
        store = open_store(pg_url)
        yield store
        store.close()


def bound_parameters_at_most(store: Store, limit: int) -> None:
    """The SQLite store's connections refuse a statement with more than `limit` bound
    parameters ('too many SQL variables'), as SQLite built with a small limit would."""
    assert isinstance(store, SqlStore)

    def lower(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)

    event.listen(store.engine, "connect", lower)
    store.engine.dispose()  # connections made before the listener go
