"""kill -9 of the leading control-plane process in the middle of a rollout, with an agent
on each of two replicas (separate `autoglm cloud serve` processes on one PostgreSQL): the
other replica takes the lease and carries the rollout on; the device whose replica died
reconnects when it is back, and nobody counts the restart as a device failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.service.serde import bootstrap_from_registration
from cloud.state_dir import load_secrets
from edge_agent.config import load_agent_config
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import AgentThread, enroll_identity, start_agent, wait_for
from tests.support.broker import start_broker
from tests.support.bundles import make_version
from tests.support.cloud import init_plane
from tests.support.replica import Replica

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED
ENV = {
    "AUTOGLM_CLOUD_LEADER_ELECTION": "auto",  # PostgreSQL: a lease row in the store
    "AUTOGLM_CLOUD_LEADER_LEASE_S": "2.0",
    "AUTOGLM_CLOUD_ROLLOUT_INTERVAL_S": "0.2",
    "AUTOGLM_CLOUD_DESIRED_POLL_INTERVAL_S": "0.2",
    "AUTOGLM_CLOUD_PRESENCE_FLUSH_INTERVAL_S": "0.2",
}


@pytest.mark.timeout(900)
def test_kill_9_of_the_leader_mid_rollout_the_other_carries_on(
    tmp_path: Path, pg_url: str, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    state = tmp_path / "cloud"
    token = init_plane(state, pg_url).operator_token
    replicas = [Replica(state, name, tmp_path, ENV) for name in ("r-a", "r-b")]
    agents: dict[str, AgentThread] = {}
    broker = start_broker(tmp_path / "broker")
    try:
        wait_for(lambda: any(r.leads() for r in replicas), timeout=60)
        leader, other = sorted(replicas, key=lambda r: not r.leads())
        key = load_secrets(state).signing_key
        v1 = make_version(trained, tmp_path / "v1", "1", key)
        v2 = make_version((tmp_path / "v1", key), tmp_path / "v2", "2", key)
        with other.client(token) as client:
            client.push_bundle(v1)
            client.push_bundle(v2)
        for name, replica in (("on-leader", leader), ("on-other", other)):
            with replica.client(token) as client:
                registered = client.register_device(
                    operator_pb2.RegisterDeviceRequest(
                        name=name, labels={"site": "a"}, profile="jetson-orin-nx"
                    )
                )
            enroll_identity(bootstrap_from_registration(registered), tmp_path / name)
            config = {
                "state_dir": tmp_path / name,
                "cloud": {"heartbeat_interval_s": 0.2, "device_address": replica.device_address},
                "reconnect": {"initial_s": 0.2, "max_s": 1.0},
                "mqtt": {"port": broker.port, "host": "127.0.0.1", "alert_prefix": name},
                "assets": [{"name": "pump-0", "topics": [f"plant/{name}/+"]}],
                "model": {"bundle": v1},
                "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5},
            }
            agents[name] = start_agent(load_agent_config(None, config))
        with other.client(token) as client:
            wait_for(lambda: all(d.online for d in client.list_devices()), timeout=60)
            rollout = client.create_rollout(
                operator_pb2.CreateRolloutRequest(
                    model_name="pump",
                    model_version="2",
                    selector="site=a",
                    waves=["1", "100%"],
                    gates=operator_pb2.RolloutGates(min_shadow_windows=1),
                )
            ).id

        # The leader dies without a word while the canary wave is being installed.
        leader.kill()
        wait_for(other.leads, timeout=60)
        # Its replica comes back on the same ports (a restarted pod behind its Service); its
        # device reconnects and catches up.
        leader.start()

        def state() -> operator_pb2.Rollout:
            with other.client(token) as client:
                return client.get_rollout(rollout)

        wait_for(lambda: state().state == SUCCEEDED, timeout=300, interval=0.5)
        done = state()
        devices = {d.device_name: (d.state, d.detail) for d in done.devices}
        assert {s for s, _ in devices.values()} == {"updated"}, (devices, done.reason)
        wait_for(
            lambda: (
                {n: a.agent.model.version if a.agent.model else "" for n, a in agents.items()}
                == {"on-leader": "2", "on-other": "2"}
            ),
            timeout=60,
        )
        assert other.leads() and "now leads" not in leader.log.read_text()
    finally:
        for agent in agents.values():
            agent.stop()
        for replica in replicas:
            replica.stop()
        broker.stop()
