"""The store backends the store contract runs on (tests/test_store_contract*.py), and what
its tests share: a clock reading and the certificate callbacks of an enrollment."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.domain import DeviceRecord
from cloud.store import Store, open_store

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
