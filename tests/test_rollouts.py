"""Rollouts end to end: a real control plane, real agents (each with its own state dir and
broker topics) over a real Mosquitto, a model trained in the test, ONNX Runtime."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.config import load_agent_config
from edge_agent.ingest.mqtt import new_client
from edge_agent.simulate import messages, read_csv_stream
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import AgentThread, enroll_identity, start_agent, wait_for
from tests.support.broker import Broker, start_broker
from tests.support.bundles import break_golden, make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.support.sensordata import write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNNING = operator_pb2.Rollout.STATE_RUNNING
SUCCEEDED = operator_pb2.Rollout.STATE_SUCCEEDED
PARTIAL = operator_pb2.Rollout.STATE_PARTIAL
ABORTED = operator_pb2.Rollout.STATE_ABORTED


@dataclass
class Fleet:
    plane: RunningPlane
    broker: Broker
    agents: dict[str, AgentThread]
    root: Path
    configs: dict[str, dict[str, object]]

    def versions(self) -> dict[str, str]:
        return {
            name: (a.agent.model.version if a.agent.model else "")
            for name, a in self.agents.items()
        }

    def restart_plane(self) -> None:
        port = self.plane.plane.device_port
        self.plane.stop()
        self.plane = start_plane(
            self.root / "cloud",
            self.plane.token,
            device_listen=f"127.0.0.1:{port}",
            presence_flush_interval_s=0.2,
            rollout_interval_s=0.2,
        )


def feed(broker: Broker, asset: str, seed: int, end_ago_s: float, rows: int = 900) -> None:
    """Publishes `rows` seconds of normal pump readings for one asset, the last one stamped
    `end_ago_s` ago (later feeds end closer to now, so no reading of theirs is late)."""
    csv = broker.directory.parent / f"feed-{asset}-{seed}.csv"
    write_experiment(csv, seed=seed, rows=rows, fault=None, labels=False)
    stream = read_csv_stream(csv)
    client = new_client()
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    anchor = time.time() - end_ago_s - float(stream.offsets[-1])
    last = None
    for _, topic, payload in messages(stream, f"plant/{asset}", anchor, batch=30):
        last = client.publish(topic, payload, qos=1)
    assert last is not None
    last.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> Iterator[Fleet]:
    """Three agents; the control plane on SQLite, or PostgreSQL with `indirect` "postgres"."""
    cloud_dir = tmp_path / "cloud"
    database = (
        request.getfixturevalue("pg_url") if getattr(request, "param", "") == "postgres" else ""
    )
    plane = start_plane(
        cloud_dir,
        init_plane(cloud_dir, database).operator_token,
        presence_flush_interval_s=0.2,
        rollout_interval_s=0.2,
        shadow_grace_s=30,
    )
    broker = start_broker(tmp_path / "broker")
    key = plane.plane.secrets.signing_key
    v1 = make_version(trained, tmp_path / "v1", "1", key)
    with plane.client() as client:
        client.push_bundle(v1)
    agents: dict[str, AgentThread] = {}
    configs: dict[str, dict[str, object]] = {}
    for i, name in enumerate(("edge-a", "edge-b", "edge-c")):
        state = tmp_path / name
        enroll_identity(register(plane, name, site="a", line=str(i % 2)), state)
        configs[name] = {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.2},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {"port": broker.port, "host": "127.0.0.1", "alert_prefix": name},
            "assets": [{"name": f"pump-{i}", "topics": [f"plant/pump-{i}/+"]}],
            "model": {"bundle": v1},
            "shadow": {"interval_s": 0.5},
            "updates": {"retry_initial_s": 0.1, "retry_max_s": 0.5, "download_attempts": 3},
        }
        agents[name] = start_agent(load_agent_config(None, configs[name]))
    for i, agent in enumerate(agents.values()):
        wait_for(lambda a=agent: a.agent.runtime.mqtt.connected.is_set(), timeout=15)
        feed(broker, f"pump-{i}", seed=200 + i, end_ago_s=2400)
    f = Fleet(plane, broker, agents, tmp_path, configs)
    wait_for(lambda: all(d.online for d in _devices(f)), timeout=15)
    yield f
    for agent in f.agents.values():
        agent.stop()
    f.plane.stop()
    broker.stop()


def _devices(f: Fleet) -> list[operator_pb2.Device]:
    with f.plane.client() as client:
        return client.list_devices()


def rollout(f: Fleet, version: str, waves: str, soak: int, **gates: float) -> str:
    with f.plane.client() as client:
        created = client.create_rollout(
            operator_pb2.CreateRolloutRequest(
                model_name="pump",
                model_version=version,
                selector="site=a",
                waves=waves.split(","),
                soak_seconds=soak,
                gates=operator_pb2.RolloutGates(**gates),  # type: ignore[arg-type]
            )
        )
    return created.id


def status(f: Fleet, rollout_id: str) -> operator_pb2.Rollout:
    with f.plane.client() as client:
        return client.get_rollout(rollout_id)


def wait_state(f: Fleet, rollout_id: str, state: int, timeout: float = 90) -> operator_pb2.Rollout:
    wait_for(lambda: status(f, rollout_id).state == state, timeout=timeout, interval=0.2)
    return status(f, rollout_id)


@pytest.mark.parametrize(
    "fleet",
    [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)],
    indirect=True,
)
def test_a_rollout_across_waves_with_shadow_soak_succeeds(fleet: Fleet) -> None:
    key = fleet.plane.plane.secrets.signing_key
    v2 = make_version((fleet.root / "v1", key), fleet.root / "v2", "2", key)
    with fleet.plane.client() as client:
        pushed = client.push_bundle(v2)
        assert [m.version for m in client.list_models("pump")] == ["1", "2"]
    assert {v.name for v in pushed.variants} >= {"fp32"}
    rollout_id = rollout(fleet, "2", "1,100%", soak=2, min_shadow_windows=20)
    first = status(fleet, rollout_id)
    assert [w.target_devices for w in first.waves] == [1, 2]
    done = wait_state(fleet, rollout_id, SUCCEEDED)
    assert fleet.versions() == {"edge-a": "2", "edge-b": "2", "edge-c": "2"}
    for device in done.devices:
        assert device.state == "updated", device
        assert device.previous_version == "1"
        # The same network under another version: the shadow gate saw full agreement.
        assert device.shadow_windows >= 20 and device.shadow_agreement == 1.0, device
    for agent in fleet.agents.values():
        pointer = json.loads((agent.agent.config.state_dir / "models/active.json").read_text())
        assert pointer["active"]["version"] == "2"
        assert agent.agent.status().slot == pointer["active"]["slot"]


def test_a_self_test_failure_aborts_and_a_new_rollout_can_follow(fleet: Fleet) -> None:
    key = fleet.plane.plane.secrets.signing_key
    broken = make_version((fleet.root / "v1", key), fleet.root / "v4", "4", key)
    break_golden(broken, key)
    with fleet.plane.client() as client:
        client.push_bundle(broken)
    rollout_id = rollout(fleet, "4", "1,100%", soak=0)
    done = wait_state(fleet, rollout_id, ABORTED)
    canary = next(d for d in done.devices if d.wave == 0)
    assert "self_test_failed" in canary.detail and "golden" in canary.detail, canary.detail
    assert set(fleet.versions().values()) == {"1"}
    # Failures allowed by the gate still never make a success: the rollout ends partial and
    # names the devices that failed.
    partial = wait_state(
        fleet, rollout(fleet, "4", "100%", soak=0, max_failure_fraction=1.0), PARTIAL
    )
    assert "3 of 3 device(s) failed" in partial.reason and "edge-a" in partial.reason, partial
    assert set(fleet.versions().values()) == {"1"}
    # The devices are free again: a good version rolls out without a soak.
    v5 = make_version((fleet.root / "v1", key), fleet.root / "v5", "5", key)
    with fleet.plane.client() as client:
        client.push_bundle(v5)
    v5_rollout = rollout(fleet, "5", "1,50%,100%", soak=0)
    wait_state(fleet, v5_rollout, SUCCEEDED)
    assert set(fleet.versions().values()) == {"5"}
    # Undone after it succeeded: every device goes back to what it served before.
    with fleet.plane.client() as client:
        undone = client.rollout_action("undo", v5_rollout, "misses cavitation")
    assert undone.state == ABORTED and undone.reason == "undone: misses cavitation", undone
    wait_for(lambda: set(fleet.versions().values()) == {"1"}, timeout=60)
    assert {d.state for d in status(fleet, v5_rollout).devices} == {"rolled_back"}


def test_abort_sends_updated_devices_back_and_a_restarted_plane_carries_on(
    fleet: Fleet,
) -> None:
    key = fleet.plane.plane.secrets.signing_key
    v2 = make_version((fleet.root / "v1", key), fleet.root / "v2", "2", key)
    with fleet.plane.client() as client:
        client.push_bundle(v2)
    # One device is offline for the whole first rollout.
    fleet.agents.pop("edge-c").stop()
    wait_for(lambda: not next(d for d in _devices(fleet) if d.name == "edge-c").online)
    rollout_id = rollout(fleet, "2", "1,100%", soak=3, min_shadow_windows=20)
    wait_for(
        lambda: any(d.state == "updated" for d in status(fleet, rollout_id).devices),
        timeout=60,
        interval=0.1,
    )
    # The control plane restarts mid-rollout (wave 1 soaking): it carries on from the store.
    fleet.restart_plane()
    done = wait_state(fleet, rollout_id, SUCCEEDED)
    states = {d.device_name: d.state for d in done.devices}
    assert states == {"edge-a": "updated", "edge-b": "updated", "edge-c": "deferred"}, states
    # The offline device comes back and catches up.
    fleet.agents["edge-c"] = start_agent(load_agent_config(None, fleet.configs["edge-c"]))
    wait_for(lambda: fleet.versions()["edge-c"] == "2", timeout=60)
    wait_for(
        lambda: {d.state for d in status(fleet, rollout_id).devices} == {"updated"}, timeout=30
    )

    # A second rollout, aborted by the operator after its canary was updated: the canary
    # goes back to v2 (from its other slot, no download), the rest drop their shadow model.
    v6 = make_version((fleet.root / "v1", key), fleet.root / "v6", "6", key)
    with fleet.plane.client() as client:
        client.push_bundle(v6)
    for i in range(3):  # fresh rows for the shadow comparisons (swapped agents start empty)
        feed(fleet.broker, f"pump-{i}", seed=300 + i, end_ago_s=1200)
    second = rollout(fleet, "6", "1,100%", soak=3, min_shadow_windows=20)
    wait_for(
        lambda: any(d.state == "updated" for d in status(fleet, second).devices),
        timeout=90,
        interval=0.1,
    )
    with fleet.plane.client() as client:
        aborted = client.rollout_action("abort", second, "operator changed their mind")
    assert aborted.state == ABORTED
    wait_for(lambda: set(fleet.versions().values()) == {"2"}, timeout=60)
    wait_for(lambda: all(a.agent.updater.shadow is None for a in fleet.agents.values()))
    devices = status(fleet, second).devices
    assert {d.state for d in devices} == {"rolled_back"}
    # The canary's previous version is what it reported serving when it installed. (A target
    # aborted before its install report keeps the status read at creation, which can be stale
    # -- edge-c had just caught up -- so the device itself decides: only one serving the
    # aborted version goes back, and every device above is on v2.)
    canary = next(d for d in devices if d.wave == 0)
    assert canary.previous_version == "2", canary


def test_a_candidate_that_disagrees_in_shadow_trips_the_behaviour_gate(fleet: Fleet) -> None:
    key = fleet.plane.plane.secrets.signing_key
    # The same network with thresholds that flag every window: it installs and passes its
    # self-test (the golden outputs are the network's), only its behaviour differs.
    jumpy = make_version(
        (fleet.root / "v1", key),
        fleet.root / "v3",
        "3",
        key,
        decision__residual_threshold=1e-6,
        decision__prob_threshold=1e-6,
    )
    with fleet.plane.client() as client:
        client.push_bundle(jumpy)
    rollout_id = rollout(
        fleet, "3", "1,100%", soak=2, min_shadow_windows=20, min_shadow_agreement=0.9
    )
    done = wait_state(fleet, rollout_id, ABORTED)
    canary = next(d for d in done.devices if d.wave == 0)
    assert "agreement" in canary.detail, canary.detail
    assert canary.shadow_windows >= 20 and canary.shadow_agreement < 0.5, canary
    # The device measured the noise floor (the incumbent with itself recalibrated), and it
    # does not excuse a candidate this far off.
    assert canary.shadow_self_agreement > 0.5, canary
    # It timed both models batch by batch and said how often (the gate judges a tail only
    # on enough batches).
    stored = fleet.plane.plane.store.rollout_target(rollout_id, canary.device_id)
    assert stored is not None and stored.shadow["latency_samples"] > 0, stored
    assert 0 < stored.shadow["latency_p50_ms"] <= stored.shadow["latency_p99_ms"], stored
    assert "failed" in done.reason
    assert set(fleet.versions().values()) == {"1"}
    wait_for(lambda: all(a.agent.updater.shadow is None for a in fleet.agents.values()))
    # The second wave never got the version.
    assert {d.state for d in done.devices if d.wave == 1} == {"waiting"}


def test_a_tampered_artifact_is_refused_by_the_canary_and_the_rollout_stops(
    fleet: Fleet,
) -> None:
    key = fleet.plane.plane.secrets.signing_key
    v7 = make_version((fleet.root / "v1", key), fleet.root / "v7", "7", key)
    with fleet.plane.client() as client:
        pushed = client.push_bundle(v7)
    # The network files change at rest in the artifact store after the push was accepted.
    for variant in pushed.variants:
        stored = fleet.plane.plane.artifacts.path(variant.digest)  # type: ignore[attr-defined]
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    done = wait_state(fleet, rollout(fleet, "7", "1,100%", soak=0), ABORTED)
    canary = next(d for d in done.devices if d.wave == 0)
    assert "verify_failed" in canary.detail and "expected sha256:" in canary.detail, canary
    assert set(fleet.versions().values()) == {"1"}
    for agent in fleet.agents.values():  # nothing half-downloaded is left behind
        assert not list((agent.agent.config.state_dir / "models").rglob("*.part"))
