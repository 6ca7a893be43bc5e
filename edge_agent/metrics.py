"""The agent's Prometheus metrics and health endpoints, on localhost by default
(`metrics.listen`):

- `/metrics`: ingest, drops by reason, inference latency and batch size as histograms (so a
  fleet's can be summed), outbox, calibration, the models served, links, disk;
- `/healthz/live`: 200 while the data path's threads run (a supervisor restarts the agent
  otherwise);
- `/healthz/ready` (and `/healthz`): 200 while a model serves and the broker is connected.
  Both answer a JSON object naming what is wrong.

Counters are read from the parts at each scrape (what the heartbeat reports too); the two
histograms are observed by the inference thread as batches finish.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_agent.errors import LocalStateError
from protos.autoglm.v1 import agent_pb2

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class AgentMetrics:
    """The registry, and the histograms the inference thread observes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.inference_seconds = Histogram(
            "autoglm_agent_inference_seconds",
            "Time from a window being cut to its scores (queueing and batching included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_windows = Histogram(
            "autoglm_agent_batch_windows",
            "Windows per inference call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe_batch(self, waits_s: Sequence[float]) -> None:
        for wait in waits_s:
            self.inference_seconds.observe(wait)
        self.batch_windows.observe(len(waits_s))

    def watch(self, agent: Agent) -> None:
        self.registry.register(AgentCollector(agent))


class AgentCollector(Collector):
    """What the agent's parts count, read at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        agent = self.agent
        runtime = agent.runtime
        # Counters only: the heartbeat's ingest-rate mark is not the scrape's to move.
        health = agent.health(rates_since_last=False)
        readings = CounterMetricFamily(
            "autoglm_agent_readings", "Readings accepted per asset.", labels=("asset",)
        )
        calibrated = GaugeMetricFamily(
            "autoglm_agent_calibrated", "1 once the asset's site calibration is done.",
            labels=("asset",),
        )  # fmt: skip
        for runner in runtime.runners:
            readings.add_metric([runner.name], runner.aligner.readings + runner.carried_readings)
            calibrated.add_metric([runner.name], int(runner.calibration is not None))
        dropped = CounterMetricFamily(
            "autoglm_agent_dropped", "Readings and records dropped, by reason.", labels=("reason",)
        )
        for reason, n in sorted(health.dropped_by_reason.items()):
            dropped.add_metric([reason], n)
        yield from (readings, calibrated, dropped)
        yield from _drift_families(health.drift)
        yield CounterMetricFamily(
            "autoglm_agent_windows_scored", "Windows scored.", value=health.windows_scored
        )
        yield CounterMetricFamily(
            "autoglm_agent_alerts_raised", "Alerts raised on site.", value=health.alerts_raised
        )
        yield CounterMetricFamily("autoglm_agent_errors", "Internal errors.", value=health.errors)
        yield GaugeMetricFamily(
            "autoglm_agent_outbox_depth", "Records waiting to sync.", value=health.outbox_depth
        )
        yield GaugeMetricFamily(
            "autoglm_agent_outbox_bytes", "Bytes of records waiting to sync.",
            value=health.outbox_bytes,
        )  # fmt: skip
        unsaved = agent.sync.stats.unsaved_ack
        yield GaugeMetricFamily(
            "autoglm_agent_outbox_unsaved_acks",
            "Sequences the control plane acknowledged that the outbox could not mark (disk full).",
            value=max(0, unsaved - agent.outbox.acked) if unsaved else 0,
        )
        yield GaugeMetricFamily(
            "autoglm_agent_disk_free_bytes", "Free bytes on the state directory's disk.",
            value=health.disk_free_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "autoglm_agent_mqtt_connected", "1 while the broker is connected.",
            value=int(runtime.mqtt.connected.is_set()),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "autoglm_agent_cloud_connected", "1 while a session with the control plane is open.",
            value=int(agent.session.connected),
        )  # fmt: skip
        models = GaugeMetricFamily(
            "autoglm_agent_model_info", "The models this agent runs (1 per model and role).",
            labels=("role", "name", "version", "backend"),
        )  # fmt: skip
        if agent.model is not None:
            m = agent.model
            models.add_metric(["serving", m.manifest.name, m.version, m.choice.label], 1)
        shadow = agent.updater.shadow
        if shadow is not None:
            s = shadow.model
            models.add_metric(["shadow", s.manifest.name, s.version, s.choice.label], 1)
        yield models


_DRIFT = (
    ("input_shift", "Largest shift of a sensor's recent mean, in calibration deviations."),
    ("spread_ratio", "Largest ratio of a sensor's recent to calibration spread (either way)."),
    ("masked_fraction", "Share of recent inputs missing."),
    ("score_median", "Median recent window score (1.0 is the alert threshold)."),
    ("alerts_per_day", "Raises per day over the recent windows."),
)


def _drift_families(drift: Mapping[str, agent_pb2.AssetDrift]) -> Iterator[GaugeMetricFamily]:
    for field, text in _DRIFT:
        family = GaugeMetricFamily(f"autoglm_agent_drift_{field}", text, labels=("asset",))
        for asset, report in sorted(drift.items()):
            family.add_metric([asset], float(getattr(report, field)))
        yield family


def health_problems(agent: Agent) -> tuple[list[str], list[str]]:
    """(why it is not live, why it is not ready); empty lists when it is."""
    runtime = agent.runtime
    dead = [name for name, alive in runtime.threads_alive().items() if not alive]
    unready = []
    if agent.model is None:
        unready.append("no model serving")
    if not runtime.mqtt.connected.is_set():
        unready.append(f"broker {agent.config.mqtt.host}:{agent.config.mqtt.port} not connected")
    if agent.outbox.problem is not None:
        unready.append(f"outbox unavailable: {agent.outbox.problem}")
    return [f"thread {name} not running" for name in dead], unready


class MetricsServer:
    """/metrics and /healthz/{live,ready} over plain HTTP in a thread."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        problems: Callable[[], tuple[list[str], list[str]]],
    ) -> None:
        host, _, port = listen.rpartition(":")
        handler = _handler(registry, problems)
        try:
            self.server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler)
        except OSError as exc:
            raise LocalStateError(f"metrics.listen {listen}: cannot listen ({exc})") from None
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on http://%s:%d", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(
    registry: CollectorRegistry, problems: Callable[[], tuple[list[str], list[str]]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path in ("/healthz", "/healthz/ready", "/healthz/live"):
                    not_live, not_ready = problems()
                    wrong = not_live if path.endswith("live") else not_live + not_ready
                    body = json.dumps({"ok": not wrong, "problems": wrong}).encode()
                    self._send(503 if wrong else 200, "application/json", body)
                else:
                    self._send(404, "text/plain", b"/metrics, /healthz/live, /healthz/ready\n")
            except Exception:
                log.exception("metrics: %s failed", path)
                self._send(500, "text/plain", b"internal error; see the agent's log\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds: not worth a log line each

    return Handler
