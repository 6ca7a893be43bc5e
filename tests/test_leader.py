"""Two control-plane processes on one PostgreSQL: one leads (runs the rollout controller),
the other takes over within the lease time when the leader is killed."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.leader import LEASE_NAME
from cloud.state_dir import init_state_dir
from cloud.store import open_store
from tests.support.agents import wait_for
from tests.support.replica import Replica

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]
LEASE_S = 2.0


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[str, list[Replica]]]:
    state = tmp_path / "cloud"
    init_state_dir(state, ["localhost"], database_url=pg_url)
    env = {
        "AUTOGLM_CLOUD_LEADER_LEASE_S": str(LEASE_S),
        "AUTOGLM_CLOUD_LEADER_ELECTION": "auto",  # PostgreSQL: a lease row in the store
    }
    started = [Replica(state, name, tmp_path, env) for name in ("replica-a", "replica-b")]
    yield pg_url, started
    for r in started:
        r.stop()


def test_one_leader_and_a_takeover_within_the_lease(replicas: tuple[str, list[Replica]]) -> None:
    pg_url, (a, b) = replicas
    store = open_store(pg_url)
    try:

        def holder() -> str:
            lease = store.get_lease(LEASE_NAME)
            return lease.holder if lease is not None else ""

        wait_for(lambda: holder() in ("replica-a", "replica-b"), timeout=15)
        time.sleep(3 * LEASE_S)  # several renewals: the lease stays where it is
        first = holder()
        leader, other = (a, b) if first == "replica-a" else (b, a)
        assert leader.leads() and not other.leads(), (leader.log.read_text(), other.log.read_text())

        # The leader dies without a word (kill -9): the other takes over within the lease.
        leader.kill()
        killed_at = time.monotonic()
        wait_for(lambda: holder() == other.name, timeout=30)
        wait_for(other.leads, timeout=30)
        took = time.monotonic() - killed_at
        # The lease plus a renewal period, with a wide margin for a busy machine.
        assert took < 3 * LEASE_S + 5, f"takeover took {took:.1f} s"
    finally:
        store.close()


def test_a_leader_stopped_gracefully_hands_over_at_once(
    replicas: tuple[str, list[Replica]],
) -> None:
    pg_url, (a, b) = replicas
    store = open_store(pg_url)
    try:
        wait_for(lambda: a.leads() or b.leads(), timeout=15)
        leader, other = (a, b) if a.leads() else (b, a)
        held = store.get_lease(LEASE_NAME)
        assert held is not None and held.holder == leader.name
        leader.stop()  # SIGTERM: the lease is released on the way out
        # Released, not left to run out: once the process has exited its lease has already
        # expired (an unreleased one runs up to a lease past its last renewal). A slow stop
        # can only make this pass, never fail.
        released = store.get_lease(LEASE_NAME)
        assert released is not None
        now = dt.datetime.now(dt.UTC)
        assert released.holder != leader.name or released.expires_at <= now, (released, now)
        wait_for(other.leads, timeout=30)
        lease = store.get_lease(LEASE_NAME)
        assert lease is not None and lease.holder == other.name
    finally:
        store.close()
