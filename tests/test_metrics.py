"""Metrics and health on both sides, scraped by a real Prometheus after real traffic: a control
plane and an agent (real broker, model, session and sync), readings published over MQTT."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest

from cloud.service.metrics import FLEET_FAMILIES, FleetCollector, PlaneMetrics
from cloud.store import open_store
from edge_agent.config import load_agent_config
from edge_agent.ingest.mqtt import new_client
from tests.conftest import register
from tests.support.agents import enroll_identity, start_agent, wait_for
from tests.support.broker import Broker
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.support.datapath import pump
from tests.support.prometheus import Prometheus
from tests.support.sensordata import SENSORS

pytestmark = [pytest.mark.integration]


@pytest.fixture
def metered_plane(tmp_path: Path) -> Iterator[RunningPlane]:
    result = init_plane(tmp_path / "cloud")
    running = start_plane(
        tmp_path / "cloud",
        result.operator_token,
        presence_flush_interval_s=0.2,
        metrics_listen="127.0.0.1:0",
    )
    yield running
    running.stop()


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


DASHBOARDS = Path(__file__).resolve().parents[1] / "helm/autoglm-cloud/dashboards"
PROMQL_WORDS = {"sum", "by", "max", "min", "rate", "increase", "topk", "count", "time",
                "histogram_quantile", "le", "without", "avg", "bool"}  # fmt: skip


def _exported(url: str) -> set[str]:
    """Series names a /metrics page can give: its families, with a histogram's parts."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = {"up"}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def _metric_names(board: Path) -> set[str]:
    """The metric names in a dashboard's queries (label names and values left out)."""
    names = set()
    for panel in json.loads(board.read_text())["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\{[^}]*\}", "", target["expr"])  # label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
            expr = re.sub(r"by \([^)]*\)", "", expr)  # grouping labels
            names |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)}
    return names - PROMQL_WORDS


def test_prometheus_scrapes_both_sides_after_real_traffic(
    metered_plane: RunningPlane,
    broker: Broker,
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
) -> None:
    plane = metered_plane
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1"), state)
    bundle = make_version(trained, tmp_path / "bundle", "1", plane.plane.secrets.signing_key)
    config = load_agent_config(
        None,
        {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.3},
            "mqtt": {"port": broker.port, "host": "127.0.0.1"},
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
            "outbox": {"prediction_every": 1},
            "metrics": {"listen": "127.0.0.1:0"},
        },
    )
    running = start_agent(config)
    agent = running.agent
    prometheus: Prometheus | None = None
    publisher = new_client()
    try:
        wait_for(lambda: agent.metrics_server is not None, timeout=30)
        assert agent.metrics_server is not None
        agent_url = f"http://127.0.0.1:{agent.metrics_server.port}"
        wait_for(lambda: agent.runtime.mqtt.connected.is_set(), timeout=30)
        status, doc = _get(f"{agent_url}/healthz/ready")
        assert status == 200 and doc["ok"], doc
        alive = agent.runtime.threads_alive()  # what /healthz/live watches
        assert {"pipeline", "inference", "sink", "mqtt"} <= {n for n, up in alive.items() if up}
        prometheus = Prometheus(
            tmp_path / "prometheus",
            {"plane": f"127.0.0.1:{plane.plane.metrics_port}", "agent": agent_url[7:]},
        )
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        rows = pump(300, faulty=False, seed=3)
        start = time.time() - rows.shape[0]
        for i in range(rows.shape[0]):
            for j, sensor in enumerate(SENSORS):
                doc = {"ts": start + i, "value": float(rows[i, j])}
                publisher.publish(f"plant/pump-1/{sensor}", orjson.dumps(doc), qos=1)
        runtime = agent.runtime
        sent = rows.size
        wait_for(lambda: runtime.decoder.accepted == sent, timeout=60)
        wait_for(lambda: runtime.counters.windows_scored > 100, timeout=60)
        box = agent.outbox
        wait_for(lambda: box.stats().depth == 0 and box.acked > 0, timeout=60)
        scored = runtime.counters.windows_scored
        stored = box.acked

        def scraped(expr: str, want: float) -> bool:
            value = prometheus.value(expr) if prometheus is not None else None
            return value is not None and value >= want

        # Both targets up, and the series follow what happened (each scrape every second).
        wait_for(lambda: scraped('up{job="plane"}', 1) and scraped('up{job="agent"}', 1), 30)
        wait_for(lambda: scraped("autoglm_agent_windows_scored_total", scored), timeout=30)
        wait_for(lambda: scraped('autoglm_agent_readings_total{asset="pump-1"}', sent), 30)
        wait_for(lambda: scraped("autoglm_agent_inference_seconds_count", scored), timeout=30)
        wait_for(lambda: scraped('autoglm_records_total{result="stored"}', stored), timeout=30)
        wait_for(lambda: scraped("autoglm_heartbeats_total", 1), timeout=30)
        # The agent's session went through every setup phase; the loop's lag is sampled.
        for phase in ("lookup", "hello", "state"):
            series = f'autoglm_session_setup_seconds_count{{phase="{phase}"}}'
            wait_for(lambda series=series: scraped(series, 1), timeout=30)
        wait_for(lambda: scraped("autoglm_event_loop_lag_seconds_count", 10), timeout=30)
        wait_for(lambda: scraped('autoglm_devices{state="active"}', 1), timeout=30)
        wait_for(lambda: scraped("autoglm_devices_online", 1), timeout=30)
        wait_for(lambda: scraped("autoglm_sessions_open", 1), timeout=30)
        expiry = prometheus.value('autoglm_device_cert_expiry_timestamp_seconds{device="edge-1"}')
        assert expiry is not None and expiry > time.time() + 300 * 86_400, expiry
        assert prometheus.value('autoglm_agent_calibrated{asset="pump-1"}') == 1
        assert prometheus.value("autoglm_agent_mqtt_connected") == 1
        models = prometheus.query("autoglm_agent_model_info")
        assert [(m["role"], m["version"]) for m, _ in models] == [("serving", "1")], models
        # gRPC server metrics: the device's session is counted as started.
        sessions = prometheus.value(
            'sum(grpc_server_started_total{grpc_service="autoglm.v1.AgentService",'
            'grpc_method="Session"})'
        )
        assert sessions is not None and sessions >= 1, sessions
        # A refused operator call is counted with its code.
        with plane.client(token="not-a-token") as client, pytest.raises(Exception):  # noqa: B017
            client.list_devices()
        wait_for(lambda: scraped('sum(grpc_server_handled_total{grpc_code="UNAUTHENTICATED"})', 1))

        # Every query of the shipped Grafana dashboards names a metric one side exports.
        exported = _exported(f"http://127.0.0.1:{plane.plane.metrics_port}/metrics")
        exported |= _exported(f"{agent_url}/metrics")
        unknown = {
            f"{board.name}: {name}"
            for board in sorted(DASHBOARDS.glob("*.json"))
            for name in _metric_names(board)
            if name not in exported
        }
        assert not unknown, sorted(unknown)

        # Not ready once the broker is gone, still live.
        broker.stop()
        wait_for(lambda: not runtime.mqtt.connected.is_set(), timeout=30)
        status, doc = _get(f"{agent_url}/healthz/ready")
        assert status == 503 and "not connected" in str(doc["problems"]), doc
        status, doc = _get(f"{agent_url}/healthz/live")
        assert status == 200, doc
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        if prometheus is not None:
            prometheus.stop()
        running.stop()


def test_the_fleet_collector_describes_every_family_it_collects(tmp_path: Path) -> None:
    """What lets a scrape of other series skip the store read: a family collected but not
    described would be left out of those scrapes, one described but not collected never
    shows."""
    store = open_store(f"sqlite:///{tmp_path / 'plane.db'}")
    try:
        fleet = FleetCollector(store, lambda: 0, lambda: True, dt.timedelta(seconds=60))
        assert sorted(f.name for f in fleet.collect()) == sorted(FLEET_FAMILIES)
        assert [f.name for f in fleet.describe()] == list(FLEET_FAMILIES)
        metrics = PlaneMetrics()
        metrics.watch_fleet(store, lambda: 0, lambda: True, dt.timedelta(seconds=60))
        read = store.state_counts
        reads: list[int] = []
        patched: Any = store
        patched.state_counts = lambda: reads.append(1) or read()
        some = generate_latest(metrics.registry.restricted_registry(["autoglm_heartbeats_total"]))
        assert b"autoglm_heartbeats_total 0.0" in some and reads == []  # no store read
        assert b"autoglm_store_up 1.0" in generate_latest(metrics.registry) and reads == [1]
    finally:
        store.close()
