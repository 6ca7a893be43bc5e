"""`autoglm cloud serve --workers N`: worker processes on one PostgreSQL share the API and
device ports, each serving part of the connections; a killed worker is started again on the
same ports, SIGTERM stops them all; SQLite and a taken port are refused, saying why."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.client import Connection, OperatorClient
from cloud.config import CONFIG_FILE
from cloud.local_broker import free_port
from cloud.service.serde import bootstrap_from_registration
from cloud.service.workers import shifted
from cloud.state_dir import load_secrets
from edge_agent.enroll import channel_options, enroll
from edge_agent.identity import load_identity
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import wait_for
from tests.support.cloud import init_plane
from tests.support.processes import running

pytestmark = [pytest.mark.integration, pytest.mark.postgres]
BIN = Path(sys.executable).parent
CONNECTIONS = 16  # all on one worker of two by chance: 2 in 2**16


@dataclass
class Pool:
    proc: subprocess.Popen[bytes]
    state: Path
    ports_file: Path
    token: str
    log: Path

    def ports(self) -> dict[str, Any]:
        return dict(json.loads(self.ports_file.read_text()))

    def workers(self) -> list[dict[str, int]]:
        return list(self.ports()["workers"])

    def client(self) -> OperatorClient:
        ca = load_secrets(self.state).ca.cert_pem
        server = f"localhost:{self.ports()['api_port']}"
        return OperatorClient(Connection(server=server, ca_pem=ca, token=self.token, timeout_s=20))


def start_pool(state: Path, work: Path, *flags: str) -> Pool:
    ports_file, log = work / "ports.json", work / f"serve-{time.monotonic_ns()}.log"
    ports_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "autoglm"), "cloud", "serve", "--state-dir", str(state),
             "--workers", "2", "--ports-file", str(ports_file), *flags],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    pool = Pool(proc, state, ports_file, "", log)
    wait_for(lambda: ports_file.exists() or proc.poll() is not None, timeout=120)
    assert ports_file.exists(), log.read_text()
    return pool


def stop(pool: Pool) -> int:
    if pool.proc.poll() is None:
        pool.proc.send_signal(signal.SIGTERM)
    return pool.proc.wait(120)


@pytest.fixture
def pool(tmp_path: Path, pg_url: str) -> Iterator[Pool]:
    state = tmp_path / "cloud"
    token = init_plane(state, pg_url).operator_token
    config = state / CONFIG_FILE
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "metrics_listen": "127.0.0.1:0"}))
    serving = start_pool(state, tmp_path)
    serving.token = token
    try:
        yield serving
    finally:
        stop(serving)


def health_checks(address: str, credentials: grpc.ChannelCredentials, server_name: str) -> None:
    """CONNECTIONS health checks, each on a connection of its own."""
    options = [
        *channel_options(server_name),
        ("grpc.use_local_subchannel_pool", 1),  # no connection shared between channels
    ]
    for _ in range(CONNECTIONS):
        with grpc.secure_channel(address, credentials, options=options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=20
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def started(metrics_port: int, service: str) -> float:
    """Calls of `service` the worker serving `metrics_port` has started."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20) as r:
        text = r.read().decode()
    labels = rf'[^}}]*grpc_service="{re.escape(service)}"[^}}]*'
    pattern = rf"^grpc_server_started_total\{{{labels}\}} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_workers_share_the_ports_and_each_serves_part_of_the_connections(
    pool: Pool, tmp_path: Path
) -> None:
    workers = pool.workers()
    assert [w["index"] for w in workers] == [0, 1]
    assert len({w["pid"] for w in workers}) == 2
    assert len({w["metrics_port"] for w in workers}) == 2
    ports = pool.ports()

    def served() -> list[float]:
        return [started(w["metrics_port"], "grpc.health.v1.Health") for w in workers]

    # Through the shared API port (TLS).
    ca = load_secrets(pool.state).ca.cert_pem
    tls = grpc.ssl_channel_credentials(root_certificates=ca)
    health_checks(f"localhost:{ports['api_port']}", tls, "")
    on_api = served()
    assert sum(on_api) == CONNECTIONS and all(on_api), on_api
    # Through the shared device port, with a device's certificate (mutual TLS).
    with pool.client() as client:
        registration = client.register_device(operator_pb2.RegisterDeviceRequest(name="pump-w"))
    enroll(bootstrap_from_registration(registration), tmp_path / "agent")
    identity = load_identity(tmp_path / "agent")
    address = f"localhost:{ports['device_port']}"
    health_checks(address, identity.credentials(), identity.info.tls_server_name)
    on_device = [after - before for before, after in zip(on_api, served(), strict=True)]
    assert sum(on_device) == CONNECTIONS and all(on_device), on_device


def test_a_pool_on_fixed_ports_starts_again_on_them_after_serving(
    tmp_path: Path, pg_url: str
) -> None:
    """Every worker starts at once on fixed ports. Connections the plane closed as it
    stopped wait out TIME_WAIT on its ports: not "in use" for the next start."""
    state = tmp_path / "cloud"
    init_plane(state, pg_url)
    api_port, device_port = free_port(), free_port()
    listen = ["--api-listen", f"127.0.0.1:{api_port}",
              "--device-listen", f"127.0.0.1:{device_port}"]  # fmt: skip
    ca = load_secrets(state).ca.cert_pem
    for _ in range(2):
        pool = start_pool(state, tmp_path, *listen)
        try:
            api = f"localhost:{api_port}"
            health_checks(api, grpc.ssl_channel_credentials(root_certificates=ca), "")
            held = socket.create_connection(("127.0.0.1", api_port))  # the plane closes it
        finally:
            assert stop(pool) == 0, pool.log.read_text()
        held.close()


def test_a_killed_worker_is_started_again_and_sigterm_stops_them_all(pool: Pool) -> None:
    killed = pool.workers()[1]["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: pool.workers()[1]["pid"] not in (0, killed), timeout=120)
    # The API answers throughout, and the new worker serves on the shared port.
    with pool.client() as client:
        assert client.list_devices() == []
    pids = [w["pid"] for w in pool.workers()]
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(120) == 0, pool.log.read_text()
    for pid in pids:
        assert not running(pid), f"worker {pid} outlived its supervisor"
    log = pool.log.read_text()
    assert f"worker 1 (pid {killed}) exited" in log and "started again" in log, log


def test_workers_stop_when_their_supervisor_is_killed(pool: Pool) -> None:
    pids = [w["pid"] for w in pool.workers()]
    pool.proc.kill()
    pool.proc.wait(30)
    for pid in pids:
        wait_for(lambda pid=pid: not running(pid), timeout=120)  # type: ignore[misc]


def test_a_workers_probe_and_metrics_ports_are_moved_up_by_its_index() -> None:
    assert shifted("0.0.0.0:9100", 2) == "0.0.0.0:9102"
    assert shifted("[::]:9100", 1) == "[::]:9101"
    assert shifted("127.0.0.1:0", 3) == "127.0.0.1:0"
    assert shifted("", 1) == ""
