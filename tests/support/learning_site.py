"""The learning loop's site: a pump with a recurring benign flow dip (a backflush the base
model flags) and one real fault, streamed over MQTT into an agent syncing to a control plane;
and the operator's steps on what it raised (verdicts, export, fine-tune) through the CLI."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.cli.main import run as autoglm
from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.ingest.mqtt import new_client
from edge_agent.simulate import Stream, messages
from protos.autoglm.v1 import operator_pb2
from tests.conftest import register
from tests.support.agents import AgentThread, enroll_identity, wait_for
from tests.support.broker import Broker
from tests.support.cloud import RunningPlane
from tests.support.sensordata import SENSORS

ROWS = 900
CALIBRATION = 120  # the small model's calibration rows
DIPS = ((250, 290), (520, 560))  # the benign backflush: flow down by 1 for 40 s
FAULT = (700, 780)  # flow down by 2.5, vibration up: what the model was trained on
AFTER = 24  # rows past a dip or the fault in which an alert still counts as its own


def site_stream(seed: int = 7) -> Stream:
    """The pump's readings, one row a second."""
    rng = np.random.default_rng(seed)
    t = np.arange(ROWS)
    load = np.sin(2 * np.pi * t / 40) + 0.1 * rng.standard_normal(ROWS)
    x = np.stack(
        [
            10 + load + 0.1 * rng.standard_normal(ROWS),
            3 + 0.5 * load + 0.05 * rng.standard_normal(ROWS),
            1 + 0.2 * load + 0.02 * rng.standard_normal(ROWS),
            0.2 + 0.01 * rng.standard_normal(ROWS),
        ],
        axis=1,
    )
    for a, b in DIPS:
        x[a:b, 0] -= 1.0
    a, b = FAULT
    x[a:b, 0] -= 2.5
    x[a:b, 3] += 0.15
    return Stream(SENSORS, t.astype(np.float64), x)


def where(row: float) -> str:
    """What happened at a row of the site's stream: "dip", "fault", or the row."""
    if any(a <= row <= b + AFTER for a, b in DIPS):
        return "dip"
    return "fault" if FAULT[0] <= row <= FAULT[1] + AFTER else f"row {row:.0f}"


class Publisher:
    def __init__(self, broker: Broker) -> None:
        self.client = new_client()
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.last: mqtt.MQTTMessageInfo | None = None

    def publish(self, stream: Stream, rows: slice, anchor: float) -> int:
        """Publishes `rows` of the stream (10 rows a message); returns the readings sent."""
        part = Stream(stream.sensors, stream.offsets[rows], stream.values[rows])
        for _, topic, payload in messages(part, "plant/pump-1", anchor, batch=10):
            self.last = self.client.publish(topic, payload, qos=1)
        assert self.last is not None
        self.last.wait_for_publish(30)
        return int(part.values.size)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def site_config(
    plane: RunningPlane,
    broker: Broker,
    tmp_path: Path,
    bundle: Path,
    **extra: Any,
) -> AgentConfig:
    """The site's agent (enrolled as edge-1, site=a); `extra` adds config sections."""
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1", site="a"), state)
    return load_agent_config(
        None,
        {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.3},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {"port": broker.port, "host": "127.0.0.1", "alert_prefix": "site"},
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
            "capture": {"sample_probability": 0.05, "samples_per_day": 300},
            "metrics": {"listen": ""},
            **extra,
        },
    )


def fleet_bundle(
    trained: tuple[Path, ed25519.Ed25519PrivateKey], plane: RunningPlane, dest: Path
) -> Path:
    """The small model, signed with the fleet's key (what the agent pinned at enrollment)."""
    source, training_key = trained
    shutil.copytree(source, dest)
    write_signed_manifest(
        dest, read_own_bundle(dest, training_key), plane.plane.secrets.signing_key
    )
    return dest


def stream_part(
    running: AgentThread, publisher: Publisher, stream: Stream, rows: slice, anchor: float
) -> None:
    wait_for(lambda: running.agent.runtime.mqtt.connected.is_set(), timeout=10)
    before = running.agent.runtime.decoder.accepted
    sent = publisher.publish(stream, rows, anchor)
    wait_for(lambda: running.agent.runtime.decoder.accepted - before == sent, timeout=60)


def cli_connection(plane: RunningPlane, tmp_path: Path) -> list[str]:
    """The CLI's flags to reach the control plane as its operator."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(plane.ca_pem)
    return ["--server", plane.api_address, "--ca-cert", str(ca), "--token", plane.token]


def give_verdicts(plane: RunningPlane, connect: list[str], anchor: float) -> None:
    """The operator's verdicts with `autoglm alerts ack`: the alerts first seen at a dip
    were false alarms, the one at the fault was real (rows counted from `anchor`)."""
    with plane.client() as client:
        for alert in client.list_alerts(operator_pb2.ListAlertsRequest()):
            first = where(alert.first_seen.ToDatetime(tzinfo=dt.UTC).timestamp() - anchor)
            verdict = {"dip": "false", "fault": "true"}.get(first)
            if verdict is not None:
                assert autoglm([*connect, "alerts", "ack", alert.id, "--verdict", verdict]) == 0


def fine_tune(connect: list[str], export: Path, out: Path, key_file: Path) -> None:
    """`autoglm model train --from-export --base pump:1` as version 2: real torch, one
    thread, a few epochs."""
    code = autoglm(
        [
            *connect,
            "model",
            "train",
            "--from-export",
            str(export),
            "--base",
            "pump:1",
            "--out",
            str(out),
            "--model-version",
            "2",
            "--epochs",
            "40",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--signing-key",
            str(key_file),
        ]
    )
    assert code == 0
