"""Two control-plane processes on one PostgreSQL: one leads (runs the rollout controller),
the other takes over within the lease time when the leader is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.leader import LEASE_NAME
from cloud.state_dir import init_state_dir
from cloud.store import open_store
from tests.support.agents import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]
BIN = Path(sys.executable).parent
LEASE_S = 2.0


class Replica:
    def __init__(self, state: Path, name: str, work: Path) -> None:
        self.name = name
        self.log = work / f"{name}.log"
        ports = work / f"{name}.ports.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
        env |= {
            "AUTOGLM_CLOUD_REPLICA_ID": name,
            "AUTOGLM_CLOUD_LEADER_LEASE_S": str(LEASE_S),
            "AUTOGLM_CLOUD_LEADER_ELECTION": "auto",  # PostgreSQL: a lease row in the store
        }
        listen = ["--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "autoglm"), "cloud", "serve", "--state-dir", str(state), *listen,
                 "--ports-file", str(ports)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        wait_for(ports.exists, timeout=30)
        self.ports = json.loads(ports.read_text())

    def leads(self) -> bool:
        return "now leads" in self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[tuple[str, list[Replica]]]:
    state = tmp_path / "cloud"
    init_state_dir(state, ["localhost"], database_url=pg_url)
    started = [Replica(state, "replica-a", tmp_path), Replica(state, "replica-b", tmp_path)]
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
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: holder() == other.name, timeout=4 * LEASE_S)
        wait_for(other.leads, timeout=2 * LEASE_S)
        took = time.monotonic() - killed_at
        assert took < LEASE_S + LEASE_S / 3 + 1.5, took
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
        leader.stop()  # SIGTERM: the lease is released on the way out
        stopped_at = time.monotonic()
        wait_for(other.leads, timeout=3 * LEASE_S)
        assert time.monotonic() - stopped_at < LEASE_S
        lease = store.get_lease(LEASE_NAME)
        assert lease is not None and lease.holder == other.name
    finally:
        store.close()
