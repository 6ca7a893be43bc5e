"""kill -9 of a real agent process while it installs and swaps models: every restart serves
a verified model, and the rollout still reaches the device."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import verify_bundle
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agent_process import AgentProcess
from tests.support.agents import enroll_identity, wait_for
from tests.support.broker import Broker, start_broker
from tests.support.bundles import make_version, train_small
from tests.support.cloud import RunningPlane, init_plane, start_plane

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RunningPlane, Broker, AgentProcess, Path]]:
    trained = train_small(tmp_path / "model")
    cloud_dir = tmp_path / "cloud"
    plane = start_plane(
        cloud_dir,
        init_plane(cloud_dir).operator_token,
        presence_flush_interval_s=0.1,
        rollout_interval_s=0.1,
        install_timeout_s=120,
    )
    broker = start_broker(tmp_path / "broker")
    key = plane.plane.secrets.signing_key
    v1 = make_version(trained, tmp_path / "v1", "1", key)
    state = tmp_path / "edge"
    enroll_identity(register(plane, "edge-k", site="k"), state)
    config = {
        "state_dir": str(state),
        "cloud": {"heartbeat_interval_s": 0.2},
        "reconnect": {"initial_s": 0.1, "max_s": 0.5},
        "mqtt": {"port": broker.port, "host": "127.0.0.1"},
        "assets": [{"name": "pump-k", "topics": ["plant/pump-k/+"]}],
        "model": {"bundle": str(v1)},
        "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = AgentProcess(path, tmp_path)
    yield plane, broker, agent, state
    agent.stop()
    plane.stop()
    broker.stop()


def device(plane: RunningPlane) -> operator_pb2.Device:
    with plane.client() as client:
        return client.get_device("edge-k")


def serving_version(plane: RunningPlane, agent: AgentProcess) -> str:
    """Waits for the restarted agent's session; returns the version it reports serving."""
    since = time.time()
    wait_for(
        lambda: device(plane).online and device(plane).last_seen.ToSeconds() > since,
        timeout=120,
        interval=0.1,
    )
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    return device(plane).status.model_version


def kill_when(agent: AgentProcess, state: Path, stage: str, rng: random.Random) -> str:
    """Kills the agent at `stage` of the install (or after a random delay): returns what was
    seen at the moment of the kill."""
    models = state / "models"
    pointer = models / "active.json"
    before = pointer.read_bytes() if pointer.exists() else b""
    deadline = time.monotonic() + (rng.uniform(0.0, 1.5) if stage == "random" else 30)
    seen = "timer"
    while time.monotonic() < deadline:
        if stage == "download" and list(models.glob("slot-*/*.part")):
            seen = "a .part being written"
            break
        if stage == "download" and list(models.glob("slot-*/.target")):
            seen = "an idle slot being prepared"
            break
        if stage == "swap" and pointer.exists() and pointer.read_bytes() != before:
            seen = "the pointer just replaced"
            break
        time.sleep(0.0005)
    agent.kill9()
    return seen


def frozen_serving(state: Path, public: ed25519.Ed25519PublicKey) -> str:
    """The version a dead agent's state directory will serve at the next start."""
    path = state / "models/active.json"
    if not path.exists():  # never installed into a slot: the configured bundle
        return "1"
    pointer = json.loads(path.read_text())
    assert pointer["active"] is not None, pointer
    slot = state / "models" / f"slot-{pointer['active']['slot']}"
    version = verify_bundle(slot, public, partial=True).version
    assert version == pointer["active"]["version"], (pointer, version)
    return version


@pytest.mark.timeout(900)  # seven restarts of a real agent process: slow on a busy machine
def test_kill_9_during_install_and_swap_leaves_a_verified_model(
    setup: tuple[RunningPlane, Broker, AgentProcess, Path], tmp_path: Path
) -> None:
    plane, _, agent, state = setup
    key = plane.plane.secrets.signing_key
    public: ed25519.Ed25519PublicKey = key.public_key()
    rng = random.Random(7)
    agent.start()
    assert serving_version(plane, agent) == "1"
    stages = ["download", "swap", "random", "random", "swap", "download", "random"]
    for n, stage in enumerate(stages, start=2):
        version = str(n)
        bundle = make_version((tmp_path / "v1", key), tmp_path / f"v{n}", version, key)
        with plane.client() as client:
            client.push_bundle(bundle)
            rollout_id = client.create_rollout(
                operator_pb2.CreateRolloutRequest(
                    model_name="pump",
                    model_version=version,
                    selector="site=k",
                    waves=["100%"],
                    soak_seconds=0,
                )
            ).id
        seen = kill_when(agent, state, stage, rng)
        if stage != "random":  # the kill landed inside the install, not after it
            assert seen != "timer", stage
        # The state on disk is frozen while the agent is dead: whatever the moment of the
        # kill, it names the old or the new version, in a slot whose every file verifies
        # against the fleet's signing key (no pointer: the configured bundle, version 1).
        left = frozen_serving(state, public)
        assert left in {str(n - 1), version}, (stage, seen, left)
        agent.start()
        serving = serving_version(plane, agent)
        # The restarted agent serves what the kill left; by the time its status is read it may
        # already have installed the new version (the rollout goes on after the restart).
        assert serving in {left, version}, (stage, seen, left, serving, agent.log())
        # ... and the rollout reaches it after the restart.
        with plane.client() as client:
            wait_for(
                lambda rid=rollout_id: client.get_rollout(rid).state == SUCCEEDED,
                timeout=120,
                interval=0.1,
            )
        wait_for(lambda v=version: device(plane).status.model_version == v, timeout=120)
        assert "Traceback" not in agent.log(), agent.log()
