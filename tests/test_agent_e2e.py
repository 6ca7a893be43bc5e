"""The agent end to end over a real Mosquitto, a real control plane and a model trained on
SKAB: alerts on site and in the cloud, nothing lost across agent, broker and control-plane
restarts."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.train import TrainParams
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.ingest.mqtt import new_client
from edge_agent.simulate import (
    Fault,
    Stream,
    messages,
    pump_stream,
    read_csv_stream,
)
from tests.conftest import register
from tests.support.agents import AgentThread, enroll_identity, start_agent, wait_for
from tests.support.broker import Broker
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.support.records import box_sequences, stored_sequences

# The module's fixture trains a SKAB model: minutes of CPU on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def _skab_dir() -> Path:
    """SKAB next to the checkout (../shared/datasets/skab), or where AUTOGLM_SKAB_DIR says."""
    candidates = [
        Path(os.environ.get("AUTOGLM_SKAB_DIR", "/nonexistent")),
        Path(__file__).resolve().parents[2] / "shared" / "datasets" / "skab",
        Path("/work/shared/datasets/skab"),
    ]
    return next((c for c in candidates if (c / "valve1").is_dir()), candidates[1])


SKAB = _skab_dir()
if not (SKAB / "valve1").is_dir():
    pytest.skip(
        "the SKAB data set is not next to this checkout; set AUTOGLM_SKAB_DIR",
        allow_module_level=True,
    )
REPLAY = SKAB / "valve1" / "8.csv"  # anomaly on rows 572-971 of 1144


@pytest.fixture(scope="module")
def skab_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ed25519.Ed25519PrivateKey]:
    """A model trained on SKAB's valve2 and other experiments (valve1 is not seen)."""
    key = ed25519.Ed25519PrivateKey.generate()
    out = tmp_path_factory.mktemp("bundle") / "skab"
    options = TrainOptions(name="skab-test", version="1", train=TrainParams(epochs=5, seed=1))
    train_bundle([SKAB / "valve2", SKAB / "other"], out, options, key, log=lambda _: None)
    return out, key


class Publisher:
    def __init__(self, broker: Broker) -> None:
        self.client = new_client()
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.last: mqtt.MQTTMessageInfo | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        self.last = self.client.publish(topic, payload, qos=1)

    def flush(self) -> None:
        if self.last is not None:
            self.last.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AlertListener:
    def __init__(self, broker: Broker) -> None:
        self.events: list[dict[str, object]] = []
        self.states: dict[str, dict[str, object]] = {}
        self.topics: set[str] = set()
        self.client = new_client()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe([("site/alerts/#", 1), ("site/state/#", 1)])
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        self.topics.add(msg.topic)
        if "/alerts/" in msg.topic:
            self.events.append(doc)
        else:
            self.states[msg.topic.rsplit("/", 1)[-1]] = doc

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_config(
    plane: RunningPlane,
    broker: Broker,
    tmp_path: Path,
    skab_bundle: tuple[Path, ed25519.Ed25519PrivateKey],
) -> AgentConfig:
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1"), state)
    source, training_key = skab_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    # The fleet's signing key signs what it ships; the agent pinned it at enrollment.
    write_signed_manifest(
        bundle, read_own_bundle(bundle, training_key), plane.plane.secrets.signing_key
    )
    return load_agent_config(
        None,
        {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.3},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {
                "port": broker.port,
                "host": "127.0.0.1",
                "alert_prefix": "site",
                "reconnect_min_s": 1,
                "reconnect_max_s": 1,
            },
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
            "outbox": {"prediction_every": 1},
        },
    )


def test_skab_replay_raises_and_clears_an_alert_on_site_and_in_the_cloud(
    plane: RunningPlane,
    broker: Broker,
    tmp_path: Path,
    skab_bundle: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    config = agent_config(plane, broker, tmp_path, skab_bundle)
    listener = AlertListener(broker)
    running = start_agent(config)
    publisher = Publisher(broker)
    try:
        wait_for(lambda: running.agent.runtime.mqtt.connected.is_set(), timeout=10)
        stream = read_csv_stream(REPLAY)
        anchor = time.time() - float(stream.offsets[-1])  # row i is stamped anchor + offset i
        sent = 0
        for _, topic, payload in messages(stream, "plant/pump-1", anchor, batch=1):
            publisher.publish(topic, payload)
            sent += 1
        publisher.flush()
        rows = stream.values.shape[0]
        assert sent == rows * len(stream.sensors)
        runtime = running.agent.runtime
        wait_for(lambda: runtime.decoder.accepted == sent, timeout=60)
        box = running.agent.outbox
        wait_for(lambda: box.stats().depth == 0 and box.acked > 0, timeout=60)
        # Every alert event the agent published on site has reached the listener (the
        # outbox can drain before the broker delivers the last one).
        counters = runtime.counters
        wait_for(
            lambda: len(listener.events) == counters.alerts_raised + counters.alerts_cleared,
            timeout=30,
        )
        events = listener.events
        rows_of = [
            int(np.searchsorted(stream.offsets, float(e["window_end"]) - anchor, "right")) - 1
            for e in events
        ]
        kinds = [e["kind"] for e in events]
        assert kinds and kinds == ["raised", "cleared"] * (len(kinds) // 2), kinds
        # Raised inside the anomaly (rows 572-971), never outside; cleared for good after it.
        assert 572 <= rows_of[0] <= 700, f"first raised at row {rows_of[0]}"
        raised_rows = [r for r, k in zip(rows_of, kinds, strict=True) if k == "raised"]
        assert all(572 <= r <= 971 for r in raised_rows), raised_rows
        assert 971 <= rows_of[-1] <= rows, f"finally cleared at row {rows_of[-1]}"
        assert all(a["key"] == b["key"] for a, b in zip(events[::2], events[1::2], strict=True))
        first = events[0]
        assert listener.states["pump-1"]["state"] == "normal"
        # Site topics and payloads name the device: agents can share a broker.
        assert first["device"] == listener.states["pump-1"]["device"] == "edge-1"
        assert "site/state/edge-1/pump-1" in listener.topics
        assert first["top_sensors"]
        # Synced to the control plane: every record exactly once.
        device = plane.plane.store.get_device("edge-1")
        store = plane.plane.store
        wait_for(lambda: len(store.list_alert_events(device.id)) >= len(kinds), timeout=30)
        alerts = store.list_alert_events(device.id)
        assert [a.kind for a in alerts] == kinds
        # The last windows may still be scored (their records written) after the outbox first
        # drained: wait for it to drain again, then compare exactly.
        wait_for(lambda: stored_sequences(store, device.id) == box_sequences(box), timeout=120)
        assert stored_sequences(store, device.id) == box_sequences(box)
        health = running.agent.status().health
        assert health.windows_scored >= rows - 400 - 10
        assert health.alerts_raised == len(raised_rows)
        assert health.inference_latency_p99_ms > 0
    finally:
        publisher.close()
        running.stop()
        listener.close()


def test_nothing_is_lost_across_agent_broker_and_control_plane_restarts(
    broker: Broker, tmp_path: Path, skab_bundle: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    cloud_dir = tmp_path / "cloud"
    plane = start_plane(
        cloud_dir, init_plane(cloud_dir).operator_token, presence_flush_interval_s=0.2
    )
    config = agent_config(plane, broker, tmp_path, skab_bundle)
    stream = pump_stream(1500, [Fault("cavitation", 800, 200)], seed=3)
    parts = np.array_split(np.arange(stream.values.shape[0]), 4)

    def part(k: int) -> Stream:
        idx = parts[k]
        return Stream(stream.sensors, stream.offsets[idx], stream.values[idx])

    anchor = time.time() - float(stream.offsets[-1])  # one clock for all four parts

    def publish(k: int, batch: int) -> int:
        for _, topic, payload in messages(part(k), "plant/pump-1", anchor, batch):
            publisher.publish(topic, payload)
        return int(part(k).values.size)  # readings (a batch message carries many)

    publisher = Publisher(broker)
    accepted = 0
    running: AgentThread = start_agent(config)
    try:
        wait_for(lambda: running.agent.runtime.mqtt.connected.is_set(), timeout=10)
        sent = publish(0, batch=1)
        publisher.flush()
        wait_for(lambda: running.agent.runtime.decoder.accepted == sent, timeout=30)
        # 1. Agent restart: what is published while it is down waits in its broker session.
        running.stop()
        accepted += running.agent.runtime.decoder.accepted
        sent += publish(1, batch=10)
        publisher.flush()
        running = start_agent(config)
        wait_for(lambda: accepted + running.agent.runtime.decoder.accepted == sent, timeout=30)
        assert running.agent.runtime.mqtt.stats.session_resumed == 1
        # 2. Broker restart: the agent reconnects and resumes its session.
        publisher.close()
        broker.stop()
        broker.start()
        publisher = Publisher(broker)
        wait_for(lambda: running.agent.runtime.mqtt.stats.connects >= 2, timeout=30)
        sent += publish(2, batch=1)
        publisher.flush()
        wait_for(lambda: accepted + running.agent.runtime.decoder.accepted == sent, timeout=30)
        # 3. Control plane offline while predictions pile up in the outbox.
        device_port = plane.plane.device_port
        plane.stop()
        sent += publish(3, batch=1)
        publisher.flush()
        wait_for(lambda: accepted + running.agent.runtime.decoder.accepted == sent, timeout=30)
        box = running.agent.outbox
        wait_for(lambda: box.stats().depth > 0, timeout=30)
        restarted = start_plane(
            cloud_dir,
            plane.token,
            device_listen=f"127.0.0.1:{device_port}",
            presence_flush_interval_s=0.2,
        )
        try:
            wait_for(lambda: running.agent.session.connected, timeout=30)
            wait_for(lambda: box.stats().depth == 0, timeout=60)
            device = restarted.plane.store.get_device("edge-1")
            store = restarted.plane.store
            wait_for(lambda: stored_sequences(store, device.id) == box_sequences(box), timeout=120)
            assert stored_sequences(store, device.id) == box_sequences(box), "gaps or extras"
            alerts = store.list_alert_events(device.id)
            assert any(a.kind == "raised" for a in alerts), "the injected fault was not alerted"
        finally:
            running.stop()
            restarted.stop()
    finally:
        publisher.close()
