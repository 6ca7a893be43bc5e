"""Two control-plane replicas on one PostgreSQL, with a real agent on each: desired state
reaches a device whichever replica holds its session (woken by change notifications, not a
poll), and an operator's action through the replica that does not lead sticks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.config import load_agent_config
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import AgentThread, enroll_identity, start_agent, wait_for
from tests.support.broker import start_broker
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED
ABORTED = operator_pb2.Rollout.STATE_ABORTED
TICK_S = 0.2


@dataclass
class TwoReplicas:
    leader: RunningPlane
    other: RunningPlane
    agents: dict[str, AgentThread]  # "on-leader", "on-other"
    root: Path

    def versions(self) -> dict[str, str]:
        return {n: a.agent.model.version if a.agent.model else "" for n, a in self.agents.items()}

    def rollout(self, plane: RunningPlane, version: str, soak: int) -> str:
        with plane.client() as client:
            created = client.create_rollout(
                operator_pb2.CreateRolloutRequest(
                    model_name="pump",
                    model_version=version,
                    selector="site=a",
                    waves=["100%"],
                    soak_seconds=soak,
                    gates=operator_pb2.RolloutGates(min_shadow_windows=1),
                )
            )
        return created.id

    def state(self, rollout_id: str) -> operator_pb2.Rollout:
        with self.other.client() as client:
            return client.get_rollout(rollout_id)


@pytest.fixture
def replicas(
    tmp_path: Path, pg_url: str, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> Iterator[TwoReplicas]:
    cloud_dir = tmp_path / "cloud"
    token = init_plane(cloud_dir, pg_url).operator_token
    settings = {
        "leader_election": "database",
        "leader_lease_s": 2.0,
        "rollout_interval_s": TICK_S,
        # Polled too rarely to matter here: desired states made on one replica reach the
        # other's devices through PostgreSQL's change notifications (cloud/store/notify.py).
        "desired_poll_interval_s": 3600.0,
        "presence_flush_interval_s": TICK_S,
    }
    planes = [start_plane(cloud_dir, token, replica_id=name, **settings) for name in ("r-1", "r-2")]
    wait_for(lambda: any(p.plane.elector.is_leader for p in planes), timeout=30)
    leader, other = sorted(planes, key=lambda p: not p.plane.elector.is_leader)
    key = leader.plane.secrets.signing_key
    v1 = make_version(trained, tmp_path / "v1", "1", key)
    with leader.client() as client:
        client.push_bundle(v1)
    broker = start_broker(tmp_path / "broker")
    agents = {}
    for name, plane in (("on-leader", leader), ("on-other", other)):
        state = tmp_path / name
        enroll_identity(register(plane, name, site="a"), state)
        config = {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.2, "device_address": plane.device_address},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {"port": broker.port, "host": "127.0.0.1", "alert_prefix": name},
            "assets": [{"name": "pump-0", "topics": ["plant/pump-0/+"]}],
            "model": {"bundle": v1},
            "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5},
        }
        agents[name] = start_agent(load_agent_config(None, config))
    fleet = TwoReplicas(leader, other, agents, tmp_path)
    with other.client() as client:
        wait_for(lambda: all(d.online for d in client.list_devices()), timeout=30)
    yield fleet
    for agent in agents.values():
        agent.stop()
    other.stop()
    leader.stop()
    broker.stop()


def test_desired_state_reaches_devices_on_both_replicas_and_an_abort_sticks(
    replicas: TwoReplicas,
) -> None:
    f = replicas
    key = f.leader.plane.secrets.signing_key
    for version in ("2", "3"):
        bundle = make_version((f.root / "v1", key), f.root / f"v{version}", version, key)
        with f.other.client() as client:
            client.push_bundle(bundle)

    # Created through the replica that does not lead: the device on the leader gets its
    # desired state through the change feed, and the leader finishes the rollout.
    first = f.rollout(f.other, "2", soak=0)
    wait_for(lambda: f.state(first).state == SUCCEEDED, timeout=120, interval=0.2)
    assert f.versions() == {"on-leader": "2", "on-other": "2"}

    # A soaking rollout aborted through the replica that does not lead, while the leader
    # keeps ticking: it stays aborted and both devices drop the aborted version.
    second = f.rollout(f.leader, "3", soak=600)
    wait_for(
        lambda: {d.state for d in f.state(second).devices} == {"shadowing"},
        timeout=120,
        interval=0.2,
    )
    with f.other.client() as client:
        assert client.rollout_action("abort", second, "changed my mind").state == ABORTED
    wait_for(
        lambda: all(a.agent.updater.shadow is None for a in f.agents.values()),
        timeout=60,
    )
    ticks = f.leader.plane.rollouts.ticks
    wait_for(lambda: f.leader.plane.rollouts.ticks >= ticks + 10, timeout=60)
    after = f.state(second)
    assert after.state == ABORTED, after
    assert {d.state for d in after.devices} == {"rolled_back"}, after
    assert f.versions() == {"on-leader": "2", "on-other": "2"}
