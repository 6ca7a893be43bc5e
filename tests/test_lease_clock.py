"""The database lease is timed on the database's clock: a replica whose own clock runs
ahead (skew past two thirds of the lease) neither takes a healthy leader's lease nor, when it
stops, releases its own into the future. Two stores (two replicas) on one PostgreSQL; on
SQLite (one file on one machine) the lease works the same on this machine's clock."""

from __future__ import annotations

import contextlib
import datetime as dt
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import cloud.clock
from cloud.leader import LEASE_NAME, DatabaseLease
from cloud.store import Store, open_store

pytestmark = pytest.mark.integration

LEASE_S = 15.0
SKEW = dt.timedelta(hours=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cloud.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    a = open_store(url)
    b = open_store(url)
    yield a, b
    b.close()
    a.close()


@contextlib.contextmanager
def _clock_ahead(monkeypatch: pytest.MonkeyPatch, by: dt.timedelta) -> Iterator[None]:
    """This process's wall clock (`cloud.clock.utc_now`) runs `by` ahead meanwhile: what a
    replica on a machine with a skewed clock reads."""

    class Ahead(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Ahead:
            real = dt.datetime.now(tz) + by
            return cls.fromtimestamp(real.timestamp(), real.tzinfo)

    with monkeypatch.context() as patch:
        patch.setattr(cloud.clock, "dt", types.SimpleNamespace(datetime=Ahead, UTC=dt.UTC))
        yield


@pytest.mark.postgres
def test_a_replica_whose_clock_runs_ahead_does_not_take_a_healthy_leaders_lease(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        leader, other = DatabaseLease(a, "a", LEASE_S), DatabaseLease(b, "b", LEASE_S)
        assert leader._attempt()
        with _clock_ahead(monkeypatch, SKEW):  # the other replica's machine, an hour ahead
            assert not other._attempt(), b.get_lease(LEASE_NAME)
        lease = a.get_lease(LEASE_NAME)
        assert lease is not None and lease.holder == "a", lease
        assert leader._attempt()  # renewed by its holder
    finally:
        b.close()
        a.close()


@pytest.mark.postgres
def test_a_stopping_leader_whose_clock_runs_ahead_hands_over_at_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        leader, other = DatabaseLease(a, "a", LEASE_S), DatabaseLease(b, "b", LEASE_S)
        with _clock_ahead(monkeypatch, SKEW):  # the leader's machine, an hour ahead
            assert leader._attempt()
            leader._release()
        lease = b.get_lease(LEASE_NAME)
        assert lease is not None
        ahead = lease.expires_at - dt.datetime.now(dt.UTC)
        assert ahead < dt.timedelta(minutes=1), f"released to expire {ahead} from now"
        assert other._attempt(), b.get_lease(LEASE_NAME)
    finally:
        b.close()
        a.close()


def test_a_released_lease_is_taken_at_once(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    leader, other = DatabaseLease(a, "a", LEASE_S), DatabaseLease(b, "b", LEASE_S)
    assert leader._attempt() and not other._attempt()
    leader._release()
    assert other._attempt() and not leader._attempt()
    lease = a.get_lease(LEASE_NAME)
    assert lease is not None and lease.holder == "b"
    left = lease.expires_at - dt.datetime.now(dt.UTC)
    assert dt.timedelta(0) < left <= dt.timedelta(seconds=LEASE_S), left
