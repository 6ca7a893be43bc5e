"""The operator's path through the real entry points, as separate processes:
cloud init → cloud serve → device register → autoglm-edge enroll → autoglm-edge run →
device list shows it online → device revoke → offline and refused."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cloud.domain import DesiredModel
from tests.conftest import register
from tests.support.agents import wait_for
from tests.support.cloud import RunningPlane

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def autoglm(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "autoglm"), *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=60,
    )
    if check:
        assert result.returncode == 0, f"autoglm {' '.join(args)}: {result.stderr}"
    return result


def _devices(tmp_path: Path) -> dict[str, dict[str, object]]:
    listing = json.loads(autoglm(tmp_path, "device", "list", "--json").stdout)
    return {d["name"]: d for d in listing}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""
    else:
        request.applymarker(pytest.mark.postgres)
        yield request.getfixturevalue("pg_url")


def test_register_enroll_run_list_revoke(tmp_path: Path, database_url: str) -> None:
    state = tmp_path / "cloud"
    init_args = [
        "cloud",
        "init",
        "--state-dir",
        str(state),
        "--host",
        "localhost",
        "--api-listen",
        "127.0.0.1:0",
        "--device-listen",
        "127.0.0.1:0",
    ]
    if database_url:
        init_args += ["--database-url", database_url]
    init = autoglm(tmp_path, *init_args)
    token = next(
        line.strip() for line in init.stdout.splitlines() if line.strip().startswith("agt_op_")
    )

    ports_file = tmp_path / "ports.json"
    server_log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(BIN / "autoglm"),
            "cloud",
            "serve",
            "--state-dir",
            str(state),
            "--ports-file",
            str(ports_file),
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        wait_for(ports_file.exists, timeout=20)
        ports = json.loads(ports_file.read_text())
        autoglm(
            tmp_path,
            "login",
            "--server",
            f"localhost:{ports['api_port']}",
            "--ca-cert",
            str(state / "ca.crt"),
            "--token",
            token,
        )

        bootstrap = tmp_path / "pump-7.bootstrap.yaml"
        autoglm(
            tmp_path,
            "device",
            "register",
            "pump-7",
            "--label",
            "site=a",
            "--label",
            "line=2",
            "--profile",
            "jetson-orin-nx",
            "--bootstrap-out",
            str(bootstrap),
        )
        assert oct(bootstrap.stat().st_mode & 0o777) == "0o600"
        assert _devices(tmp_path)["pump-7"]["state"] == "pending"

        agent_state = tmp_path / "agent"
        enroll = subprocess.run(
            [
                str(BIN / "autoglm-edge"),
                "enroll",
                "--bootstrap",
                str(bootstrap),
                "--state-dir",
                str(agent_state),
            ],
            capture_output=True,
            text=True,
            env=_env(tmp_path),
            timeout=60,
        )
        assert enroll.returncode == 0, enroll.stderr

        config = tmp_path / "agent.yaml"
        config.write_text(f"state_dir: {agent_state}\nreconnect:\n  initial_s: 0.2\n  max_s: 2\n")
        agent_log = (tmp_path / "agent.log").open("w")
        started = time.monotonic()
        agent = subprocess.Popen(
            [str(BIN / "autoglm-edge"), "run", "--config", str(config)],
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            env=_env(tmp_path),
        )
        wait_for(lambda: _devices(tmp_path)["pump-7"]["online"] is True, timeout=60, interval=0.2)
        took = time.monotonic() - started
        assert took < 60, f"online {took:.1f} s after the agent started"  # ~2 s when idle
        device = _devices(tmp_path)["pump-7"]
        assert device["labels"] == {"site": "a", "line": "2"}
        assert device["agent_version"]

        table = autoglm(tmp_path, "device", "list").stdout
        assert "pump-7" in table and "online" in table
        # -o yaml / -o json for every command that prints records (--json is -o json).
        listed = yaml.safe_load(autoglm(tmp_path, "-o", "yaml", "device", "list").stdout)
        assert [d["name"] for d in listed] == ["pump-7"] and listed[0]["online"] is True
        assert (
            json.loads(autoglm(tmp_path, "-o", "json", "device", "show", "pump-7").stdout)["name"]
            == "pump-7"
        )

        autoglm(tmp_path, "device", "revoke", "pump-7", "--reason", "stolen")
        device = _devices(tmp_path)["pump-7"]
        assert device["state"] == "revoked" and device["online"] is False
        # A revoked agent stops with the permission-denied exit code, saying why.
        assert agent.wait(60) == 6
        log = (tmp_path / "agent.log").read_text()
        assert "refused this device" in log and "revoked" in log, log
        # Decommissioned: deleted with everything stored of it.
        deleted = autoglm(tmp_path, "device", "delete", "pump-7").stdout
        assert "deleted pump-7" in deleted, deleted
        assert _devices(tmp_path) == {}
    finally:
        for proc in (agent, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()


def test_device_list_and_show_name_the_model_the_plane_wants(
    plane: RunningPlane, tmp_path: Path
) -> None:
    ca = str(tmp_path / "cloud" / "ca.crt")
    autoglm(
        tmp_path, "login", "--server", plane.api_address, "--ca-cert", ca, "--token", plane.token
    )
    for name in ("pump-a", "pump-b"):
        register(plane, name)
    store = plane.plane.store
    wanted = DesiredModel(
        device_id=store.get_device("pump-a").id,
        model_name="pump",
        model_version="2",
        manifest_digest="sha256:" + "a" * 64,
        signature_digest="sha256:" + "b" * 64,
        rollout_id="r-1",
        shadow=False,
        updated_at=dt.datetime.now(dt.UTC),
    )
    store.set_desired([wanted])  # as a rollout's wave writes it

    header, *rows = autoglm(tmp_path, "device", "list").stdout.splitlines()
    column = header.index("DESIRED")
    assert {r.split()[0]: r[column:].split()[0] for r in rows} == {
        "pump-a": "pump:2",
        "pump-b": "-",
    }
    assert "desired:     pump:2" in autoglm(tmp_path, "device", "show", "pump-a").stdout
    assert "desired:     -" in autoglm(tmp_path, "device", "show", "pump-b").stdout
    assert _devices(tmp_path)["pump-a"]["desired_model_version"] == "pump:2"
