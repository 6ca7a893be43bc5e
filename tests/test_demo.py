"""`autoglm demo` as a newcomer runs it: a process, embedded defaults, a short duration;
it must detect the faults it injects. Once with Mosquitto, once with the embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The demo trains a model: minutes on a busy 2-core machine, not the suite's default 120 s.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent


def run_demo(tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    env["HOME"] = str(tmp_path)  # no CLI context of the user's is read or written
    result = subprocess.run(
        [str(BIN / "autoglm"), "demo", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def test_the_demo_detects_its_injected_faults(tmp_path: Path) -> None:
    summary, progress = run_demo(tmp_path, "--duration", "40", "--agents", "2")
    assert set(summary) >= {
        "faults_injected",
        "faults_detected",
        "false_alarms",
        "alert_latency_p50_ms",
        "alert_latency_p99_ms",
    }
    assert summary["broker"] == "mosquitto" and summary["agents"] == 2
    assert summary["faults_injected"] == 2
    assert summary["faults_detected"] == summary["faults_injected"], summary
    assert summary["false_alarms"] == 0, summary
    assert 0 < float(summary["alert_latency_p99_ms"]) < 10_000  # type: ignore[arg-type]
    # Progress on stderr: each stage, and the alerts with their top sensors.
    for stage in ("control plane up", "training on", "pushed model", "rollout succeeded"):
        assert stage in progress, progress
    assert "ALERT pump-station-1/pump-1" in progress and "top sensors" in progress


def test_the_demo_runs_on_the_embedded_broker(tmp_path: Path) -> None:
    summary, _ = run_demo(tmp_path, "--duration", "30", "--agents", "1", "--broker", "embedded")
    assert summary["broker"] == "amqtt (embedded)"
    assert summary["faults_detected"] == summary["faults_injected"] == 1, summary


def test_bad_demo_arguments_are_clear_errors(tmp_path: Path) -> None:
    for args, message in (
        (["--duration", "5"], "at least 20 seconds"),
        (["--agents", "9"], "argument --agents: must be from 1 to 3"),
        (["--data", str(tmp_path / "nope")], "no such file"),
        (["--console", "--console-port", "70000"], "--console-port"),
    ):
        result = subprocess.run(
            [str(BIN / "autoglm"), "demo", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
