"""One process per state and per port: a second control plane on the same SQLite state or on
a port in use, and a second agent on the same state directory, stop at once and name why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.state_dir import init_state_dir
from edge_agent.files import exclusive_lock
from tests.support.agents import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}


def serve(state: Path, ports: Path, api: str = "127.0.0.1:0") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "autoglm"), "cloud", "serve", "--state-dir", str(state),
         "--api-listen", api, "--device-listen", "127.0.0.1:0", "--ports-file", str(ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )  # fmt: skip


def test_a_second_control_plane_on_the_same_state_or_port_stops_with_the_reason(
    tmp_path: Path,
) -> None:
    state = tmp_path / "cloud"
    init_state_dir(state, ["localhost"])
    first = serve(state, tmp_path / "first.json")
    try:
        wait_for((tmp_path / "first.json").exists, timeout=60)
        second = serve(state, tmp_path / "second.json")
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0, out
        assert f"in use by autoglm cloud serve (pid {first.pid}" in out, out
        other = tmp_path / "other"
        init_state_dir(other, ["localhost"])
        port = json.loads((tmp_path / "first.json").read_text())["api_port"]
        third = serve(other, tmp_path / "third.json", f"127.0.0.1:{port}")
        out, _ = third.communicate(timeout=60)
        assert third.returncode != 0, out
        assert f"cannot listen on 127.0.0.1:{port}" in out, out
        assert first.poll() is None, "the first control plane must keep running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)


def test_a_second_agent_on_the_same_state_directory_stops_naming_the_first(
    tmp_path: Path,
) -> None:
    state = tmp_path / "edge"
    with exclusive_lock(state / "agent.lock", "autoglm-edge run"):
        result = subprocess.run(
            [str(BIN / "autoglm-edge"), "run", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
    assert result.returncode != 0
    assert f"in use by autoglm-edge run (pid {os.getpid()}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
