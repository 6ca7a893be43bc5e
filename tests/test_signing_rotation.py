"""Signing-key rotation end to end, without re-enrolling: a real control plane and agent;
`rotate` makes a new key, the restarted plane hands the signing root to the agent at session
open, a bundle signed by the new key rolls out; `retire` drops the old key, and a bundle
it signs is refused by the plane and no longer verifies on the device."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.signing_keys import retire, rotate
from cloud.state_dir import load_secrets
from edge_agent.bundle import verify_bundle
from edge_agent.config import load_agent_config
from edge_agent.errors import FailedPrecondition, IntegrityError
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity, start_agent, wait_for
from tests.support.broker import start_broker
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane

pytestmark = [pytest.mark.integration, pytest.mark.slow]
YEAR = dt.timedelta(days=365)
SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED


def _restart(plane: RunningPlane, state: Path) -> RunningPlane:
    """A restart on the same device port (the agent dials it again)."""
    port = plane.plane.device_port
    plane.stop()
    return start_plane(state, plane.token, device_listen=f"127.0.0.1:{port}",
                       rollout_interval_s=0.2, presence_flush_interval_s=0.2)  # fmt: skip


def _serving(plane: RunningPlane) -> str:
    with plane.client() as client:
        return str(client.get_device("edge-1").status.model_version)


def _roll(plane: RunningPlane, version: str) -> None:
    with plane.client() as client:
        rollout = client.create_rollout(
            operator_pb2.CreateRolloutRequest(
                model_name="pump", model_version=version, selector="site=a", waves=["100%"]
            )
        )
        wait_for(lambda: client.get_rollout(rollout.id).state == SUCCEEDED, timeout=120)


@pytest.mark.timeout(600)
def test_a_rotated_key_signs_the_next_rollout_and_a_retired_one_nothing(
    tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    state = tmp_path / "cloud"
    token = init_plane(state).operator_token
    plane = start_plane(state, token, rollout_interval_s=0.2, presence_flush_interval_s=0.2)
    broker = start_broker(tmp_path / "broker")
    old_key = plane.plane.secrets.signing_key
    v1 = make_version(trained, tmp_path / "v1", "1", old_key)
    with plane.client() as client:
        client.push_bundle(v1)
    enroll_identity(register(plane, "edge-1", site="a"), tmp_path / "edge-1")
    config = {
        "state_dir": tmp_path / "edge-1",
        "cloud": {"heartbeat_interval_s": 0.2},
        "reconnect": {"initial_s": 0.2, "max_s": 1.0},
        "mqtt": {"port": broker.port, "host": "127.0.0.1"},
        "assets": [{"name": "pump-0", "topics": ["plant/pump-0/+"]}],
        "model": {"bundle": v1},
        "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5},
    }
    agent = start_agent(load_agent_config(None, config))
    try:
        trust = agent.agent.key
        assert trust.version == 1
        # Rotate, restart: the agent takes root 2 at session open, then installs a bundle
        # signed by the new key.
        rotate(state, YEAR, dt.datetime.now(dt.UTC))
        plane = _restart(plane, state)
        new_key = load_secrets(state).signing_key
        wait_for(lambda: trust.version == 2, timeout=60)
        # Retiring the old key now would strand the device: it serves v1, signed by it.
        wait_for(lambda: _serving(plane) == "1", timeout=30)
        with pytest.raises(FailedPrecondition, match=r"pump:1 \(serving on edge-1\)"):
            retire(state, YEAR, dt.datetime.now(dt.UTC))
        v2 = make_version((tmp_path / "v1", old_key), tmp_path / "v2", "2", new_key)
        with plane.client() as client:
            client.push_bundle(v2)  # the plane accepts the new key's signature
        _roll(plane, "2")
        wait_for(lambda: agent.agent.model is not None and agent.agent.model.version == "2")
        # Retire judges what the control plane has heard: wait for the heartbeat saying v2.
        wait_for(lambda: _serving(plane) == "2", timeout=30)

        # Retire the old key: its bundles are refused by the plane and by the device.
        retire(state, YEAR, dt.datetime.now(dt.UTC))
        plane = _restart(plane, state)
        wait_for(lambda: trust.version == 3, timeout=60)
        with plane.client() as client:  # the fleet view: each device says what it holds
            wait_for(lambda: client.get_device("edge-1").status.signing_root_version == 3)
        v3 = make_version((tmp_path / "v1", old_key), tmp_path / "v3", "3", old_key)
        with plane.client() as client, pytest.raises(Exception, match="signature"):
            client.push_bundle(v3)
        with pytest.raises(IntegrityError, match="does not verify with a trusted signing key"):
            verify_bundle(v3, trust)
        verify_bundle(v2, trust)
        # The kept root survives an agent restart.
        agent.stop()
        agent = start_agent(load_agent_config(None, config))
        assert agent.agent.key.version == 3
        wait_for(lambda: agent.agent.model is not None and agent.agent.model.version == "2")
    finally:
        agent.stop()
        plane.stop()
        broker.stop()
