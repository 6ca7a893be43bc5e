"""`autoglm-edge check` against real parts: a control plane over mutual TLS, a Mosquitto
broker, an enrolled identity; then each of them missing or wrong. And `autoglm-edge status`
reading a state directory."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from edge_agent.cli import run as autoglm_edge
from edge_agent.decisions import AlertEvent
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.broker import start_broker
from tests.support.cloud import RunningPlane

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"mqtt: {{host: 127.0.0.1, port: {port}}}\n"
        "assets: [{name: pump-1, topics: ['plant/pump-1/+']}]\n"
    )
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _outcomes(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, dict]]:
    code = autoglm_edge(["check", "--json", *argv])
    checks = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in checks}


def test_a_ready_device_passes_every_check(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll_identity(register(plane, "pump-7", site="a"), tmp_path / "state")
    broker = start_broker(tmp_path / "broker")
    try:
        code, checks = _outcomes(capsys, "--config", str(_config(tmp_path, broker.port)))
    finally:
        broker.stop()
    assert {n: c["outcome"] for n, c in checks.items()} == {
        "config": "ok",
        "state dir": "ok",
        "identity": "ok",
        "broker": "ok",
        "control plane": "ok",
        "model": "warning",  # nothing to serve until a rollout installs one
    }, checks
    assert code == 0
    assert "pump-7" in checks["identity"]["detail"]


def test_what_is_missing_is_named_and_fails_the_check(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, _closed_port())  # no broker, no enrollment
    code, checks = _outcomes(capsys, "--config", str(config), "--timeout", "2")
    assert code == 1
    assert checks["broker"]["outcome"] == "failed" and "mqtt.port" in checks["broker"]["detail"]
    assert checks["identity"]["outcome"] == "failed"
    assert "autoglm-edge enroll" in checks["identity"]["detail"]
    assert checks["config"]["outcome"] == "ok" and checks["state dir"]["outcome"] == "ok"


def test_a_bad_config_stops_at_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("mqtt: {port: 99999}\n")
    code, checks = _outcomes(capsys, "--config", str(config))
    assert code == 1 and list(checks) == ["config"]
    assert "mqtt.port" in checks["config"]["detail"]


def test_the_table_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = autoglm_edge(["check", "--config", str(_config(tmp_path, _closed_port())),
                         "--timeout", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    broker_line = next(line for line in out.splitlines() if "broker" in line)
    assert broker_line.startswith("failed") and "mqtt.port" in broker_line, out
    assert out.rstrip().endswith("check(s) failed"), out


def test_status_reads_the_state_directory_without_the_agent(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    enroll_identity(register(plane, "pump-7", site="a"), state)
    box = Outbox(state / "outbox.sqlite3", 1 << 20)
    box.append([(PREDICTION, b"p"), (ALERT, b"a"), (PREDICTION, b"q")])
    box.ack(2, {2: "records[1]: alert.asset: 65 characters > 64"})
    box.close()
    event = AlertEvent("raised", "pump-1-1", "pump-1", 3.5, (("flow", 0.9),), 1.0, 25.0, 25.0, "1")
    (state / "alerts").mkdir()  # as an older agent kept it
    (state / "alerts" / "pump-1.json").write_text(json.dumps(dataclasses.asdict(event)))
    assert autoglm_edge(["status", "--state-dir", str(state)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["identity"]["device"] == "pump-7"
    assert status["models"]["active"] is None  # serves the configured bundle
    assert status["signing_keys"]["root_version"] == 1  # the pinned key alone
    assert len(status["signing_keys"]["keys"]) == 1
    assert status["outbox"]["depth"] == 1 and status["outbox"]["quarantined"] == 1
    assert "65 characters" in status["outbox"]["latest_refusals"][0]["reason"]
    assert [a["key"] for a in status["open_alerts"]] == ["pump-1-1"]
