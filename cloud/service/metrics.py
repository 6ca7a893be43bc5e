"""The control plane's Prometheus metrics, served on their own plain-HTTP port
(`metrics_listen`).

Three sources: gRPC calls (`CallMetrics`, an interceptor: the `grpc_server_*` series other
gRPC servers export, so existing dashboards apply), what the servicers count as it happens
(heartbeats, records by result), and the fleet's state read from the store at each scrape
(devices, rollouts, alerts and webhook deliveries by state, what each device last reported).
Each control plane has its own registry: several can run in one process (the tests do).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud.clock import utc_now
from cloud.domain import DeviceState
from cloud.service.guard import behavior_and_factory
from cloud.store.base import Store
from edge_agent.config import ASSET_NAME
from edge_agent.errors import LocalStateError

log = logging.getLogger(__name__)
FLEET_CACHE_S = 5.0
LOOP_LAG_EVERY_S = 0.1
SETUP_PHASES = ("lookup", "hello", "state")  # of `autoglm_session_setup_seconds`
METRICS_IO_TIMEOUT_S = 10.0  # a metrics connection that sends or reads nothing this long
METRICS_CONNECTIONS = 64  # open at once on the metrics port; more are closed at once
# A metrics connection still open this long after it was accepted is closed, however it trickles
# (the I/O timeout is per read or write: a byte every few seconds would keep a slot for ever).
METRICS_CONNECTION_DEADLINE_S = 30.0
# A device names the assets of its drift series: at most this many per device, each named as
# an agent's config allows (edge_agent/config.py), so a device cannot grow the scrape.
MAX_DRIFT_ASSETS = 32
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PlaneMetrics:
    """The registry and the metrics the control plane updates as calls happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its end on the server (a session stream: its life).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "autoglm_heartbeats", "Heartbeats received from devices.", registry=self.registry
        )
        self.records = Counter(
            "autoglm_records",
            "Records synced by devices: stored, duplicate (stored before) or rejected.",
            ("result",),
            registry=self.registry,
        )
        self.delivery_attempts = Counter(
            "autoglm_webhook_attempts",
            "Alert delivery attempts by target kind and outcome: delivered, retry, dead, "
            "deferred (claimed but not sent: it waited too long for a sender slot, or the "
            "replica stopped; released at no attempt's cost and tried again later).",
            ("kind", "outcome"),
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "autoglm_webhook_delivery_seconds",
            "Time from an alert change being queued to its delivery, by target kind.",
            ("kind",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
            registry=self.registry,
        )

        self.session_setup = Histogram(
            "autoglm_session_setup_seconds",
            "Agent session setups that got through each phase: lookup (the device and its last "
            "stored record), hello (waiting for the agent's hello), state (what the session "
            "gets first).",
            ("phase",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for phase in SETUP_PHASES:  # shown at 0 before the first setup
            self.session_setup.labels(phase)
        self.loop_lag = Histogram(
            "autoglm_event_loop_lag_seconds",
            "How late the plane's event loop ran a timer (sampled every 0.1 s): the wait every "
            "heartbeat ack and session step on this replica shares (long collections, "
            "blocking work, a CPU too busy).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    async def watch_loop(self, stop: asyncio.Event, every_s: float = LOOP_LAG_EVERY_S) -> None:
        """Samples the event loop's lag into `loop_lag` until `stop` is set."""
        while not stop.is_set():
            start = time.monotonic()
            await asyncio.sleep(every_s)
            self.loop_lag.observe(max(0.0, time.monotonic() - start - every_s))

    def delivery(self, kind: str, outcome: str, latency_s: float | None) -> None:
        """One delivery attempt finished (the webhook sender's `on_result`)."""
        self.delivery_attempts.labels(kind, outcome).inc()
        if latency_s is not None:
            self.delivery_latency.labels(kind).observe(max(0.0, latency_s))

    def watch_fleet(
        self,
        store: Store,
        sessions_open: Callable[[], int],
        is_leader: Callable[[], bool],
        offline_after: dt.timedelta,
    ) -> None:
        self.registry.register(FleetCollector(store, sessions_open, is_leader, offline_after))

    def serve(self, listen: str) -> tuple[Any, int]:
        """Serves /metrics on `listen` (host:port, port 0: any free one) in a thread; returns
        the server (to `shutdown()` and `server_close()`) and the port."""
        host, _, port = listen.rpartition(":")
        try:
            server = MetricsServer(host or "0.0.0.0", int(port), make_wsgi_app(self.registry))
        except (OSError, ValueError) as exc:
            raise LocalStateError(f"cannot serve metrics on {listen}: {exc}") from None
        threading.Thread(target=server.serve_forever, name="metrics-serve", daemon=True).start()
        return server, int(server.server_port)


class MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's server (a thread per connection), except that a connection that
    sends or reads nothing for METRICS_IO_TIMEOUT_S, or is still open
    METRICS_CONNECTION_DEADLINE_S after it was accepted, is closed, and one past
    METRICS_CONNECTIONS open at once is closed at once: anyone who reaches the port could
    otherwise hold a thread each for ever with requests they never finish."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, app: Any) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__((str(address[0]), port), _MetricsHandler)
        self.set_app(app)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: %d connections open, one from %s closed", METRICS_CONNECTIONS,
                      client_address)  # fmt: skip
            self.shutdown_request(request)
            return
        threading.Thread(
            target=self._serve_one, args=(request, client_address), name="metrics-connection",
            daemon=True,
        ).start()  # fmt: skip

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: a connection from %s failed", client_address, exc_info=True)


class _MetricsHandler(WSGIRequestHandler):
    """One connection of the metrics port, logging nothing per request."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(METRICS_IO_TIMEOUT_S)  # reads and writes alike
        # And a deadline for the whole connection: shutting the socket down ends the read or
        # write the handler is blocked in, which then sees the connection closed.
        self._deadline = threading.Timer(METRICS_CONNECTION_DEADLINE_S, self._past_deadline)
        self._deadline.name = "metrics-deadline"
        self._deadline.daemon = True
        self._deadline.start()

    def _past_deadline(self) -> None:
        log.debug("metrics: a connection from %s still open after %.0f s, closed",
                  self.client_address, METRICS_CONNECTION_DEADLINE_S)  # fmt: skip
        with contextlib.suppress(OSError):  # it may have closed meanwhile
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # a client that stalled (TimeoutError) or left, or past its deadline
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


FLEET_FAMILIES = (
    "autoglm_sessions_open",
    "autoglm_leader",
    "autoglm_store_up",
    "autoglm_devices",
    "autoglm_rollouts",
    "autoglm_alerts",
    "autoglm_webhook_deliveries",
    "autoglm_devices_online",
    "autoglm_device_last_seen_timestamp_seconds",
    "autoglm_device_outbox_depth",
    "autoglm_device_sync_lag_seconds",
    "autoglm_device_drift_input_shift",
    "autoglm_device_drift_score_median",
    "autoglm_device_drift_assets_omitted",
    "autoglm_device_cert_expiry_timestamp_seconds",
)


class FleetCollector(Collector):
    """The fleet's state, read from the store at each scrape (a scrape that cannot read it
    says so in `autoglm_store_up` instead of failing). Described up front, so a scrape that
    asks for other series only (`/metrics?name[]=...`) does not read the store: with 10,000
    devices that read costs the plane seconds of CPU."""

    def __init__(
        self,
        store: Store,
        sessions_open: Callable[[], int],
        is_leader: Callable[[], bool],
        offline_after: dt.timedelta,
    ) -> None:
        self.store = store
        self.sessions_open = sessions_open
        self.is_leader = is_leader
        self.offline_after = offline_after
        # Scrapes (several Prometheus servers, anyone who can reach the port) share one read
        # of the store every few seconds: it lists the whole fleet.
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._families: list[GaugeMetricFamily] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name in FLEET_FAMILIES:
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "autoglm_sessions_open",
            "Device sessions open on this replica.",
            value=self.sessions_open(),
        )
        yield GaugeMetricFamily(
            "autoglm_leader", "1 on the replica that runs rollouts.", value=int(self.is_leader())
        )
        up = GaugeMetricFamily("autoglm_store_up", "1 when the last scrape could read the store.")
        with self._lock:  # one store read at a time, reused for FLEET_CACHE_S
            now = time.monotonic()
            if now - self._read_at >= FLEET_CACHE_S:
                try:
                    self._families = list(self._from_store())
                except Exception as exc:  # noqa: BLE001 - a scrape reports it, never fails
                    log.warning("metrics: cannot read the store (%s)", exc)
                    self._families = None
                self._read_at = now
            families = self._families
        up.add_metric([], 0 if families is None else 1)
        yield up
        yield from families or ()

    def _from_store(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.state_counts()
        for table, help_text in (
            ("devices", "Devices by state (pending: registered, not enrolled yet)."),
            ("rollouts", "Rollouts by state."),
            ("alerts", "Alerts by state."),
            ("webhook_deliveries", "Webhook deliveries by state (pending, delivered, dead)."),
        ):
            family = GaugeMetricFamily(f"autoglm_{table}", help_text, labels=("state",))
            for state, n in sorted(counts.get(table, {}).items()):
                family.add_metric([state], n)
            yield family
        now = utc_now()
        devices = self.store.device_summaries()
        online = GaugeMetricFamily(
            "autoglm_devices_online", "Active devices with a live session, heard from lately."
        )
        online.add_metric([], sum(d.is_online(now, self.offline_after) for d in devices))
        yield online
        seen = GaugeMetricFamily(
            "autoglm_device_last_seen_timestamp_seconds",
            "When each device was last heard from.",
            labels=("device",),
        )
        depth = GaugeMetricFamily(
            "autoglm_device_outbox_depth",
            "Records waiting in each device's outbox, as it last reported.",
            labels=("device",),
        )
        lag = GaugeMetricFamily(
            "autoglm_device_sync_lag_seconds",
            "Seconds since each device's last report, for devices that have reported.",
            labels=("device",),
        )
        shift = GaugeMetricFamily(
            "autoglm_device_drift_input_shift",
            "Per device and asset: the largest shift of a sensor's recent mean from calibration, "
            "in calibration deviations, as last reported.",
            labels=("device", "asset"),
        )
        scores = GaugeMetricFamily(
            "autoglm_device_drift_score_median",
            "Per device and asset: the median recent window score (1.0 is the alert threshold).",
            labels=("device", "asset"),
        )
        omitted = GaugeMetricFamily(
            "autoglm_device_drift_assets_omitted",
            f"Per device: assets it reported drift for that have no series (beyond the first "
            f"{MAX_DRIFT_ASSETS} by name, or a name no asset can have).",
            labels=("device",),
        )
        expiry = GaugeMetricFamily(
            "autoglm_device_cert_expiry_timestamp_seconds",
            "When each enrolled device's certificate expires (agents renew it before).",
            labels=("device",),
        )
        for d in devices:
            if d.cert_not_after is not None and d.state is DeviceState.ACTIVE:
                expiry.add_metric([d.name], d.cert_not_after.timestamp())
            if d.last_seen is None:
                continue
            seen.add_metric([d.name], d.last_seen.timestamp())
            lag.add_metric([d.name], (now - d.last_seen).total_seconds())
            # What an agent reported: a value of the wrong shape costs only its own series.
            if (outbox := _number(d.health.get("outbox_depth", 0))) is not None:
                depth.add_metric([d.name], outbox)
            reports, left_out = _drift_reports(d.health.get("drift"))
            for asset, report in reports:
                if (value := _number(report.get("input_shift", 0.0))) is not None:
                    shift.add_metric([d.name, asset], value)
                if (value := _number(report.get("score_median", 0.0))) is not None:
                    scores.add_metric([d.name, asset], value)
            if left_out:
                omitted.add_metric([d.name], left_out)
        yield from (seen, depth, lag, expiry, shift, scores, omitted)


def _drift_reports(drift: object) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """The per-asset drift reports a device's series are made of, and how many assets it
    reported that are left out. The device chooses the asset names, i.e. label values: at
    most MAX_DRIFT_ASSETS of them, by name, each a valid asset name (rather than truncated,
    which could make two of them one series). A report of the wrong shape costs only its own
    series, as any other malformed value."""
    if not isinstance(drift, dict):
        return [], 0
    named = sorted(a for a in drift if isinstance(a, str) and ASSET_NAME.fullmatch(a))
    kept = named[:MAX_DRIFT_ASSETS]
    reports = [(a, r) for a in kept if isinstance(r := drift[a], dict)]
    return reports, len(drift) - len(kept)


def _number(value: object) -> float | None:
    """A reported number (protobuf's JSON gives 64-bit integers as strings); None when it
    is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


class CallMetrics(aio.ServerInterceptor):
    """Counts every call, its status code and its duration (outermost interceptor, so a call
    the guard refuses is counted with the code it got)."""

    def __init__(self, metrics: PlaneMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        kind = _call_type(handler)
        labels = (service, method, kind)
        metrics = self.metrics
        behavior, factory = behavior_and_factory(handler)

        def done(context: Any, started: float, failed: bool) -> None:
            code = _code(context, failed)
            metrics.handled.labels(*labels, code).inc()
            metrics.handling.labels(*labels).observe(time.perf_counter() - started)

        async def unary(request: Any, context: Any) -> Any:
            metrics.started.labels(*labels).inc()
            started, failed = time.perf_counter(), True
            try:
                result = await behavior(request, context)
                failed = False
                return result
            finally:
                done(context, started, failed)

        async def streaming(request: Any, context: Any) -> Any:
            metrics.started.labels(*labels).inc()
            started, failed = time.perf_counter(), True
            try:
                async for item in behavior(request, context):
                    yield item
                failed = False
            finally:
                done(context, started, failed)

        return factory(
            streaming if handler.response_streaming else unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _call_type(handler: Any) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _code(context: Any, failed: bool) -> str:
    """The call's status code name: what the handler (or the guard) set, else OK, or
    UNKNOWN for a call that raised without setting one (CANCELLED when the client left)."""
    code = None
    with contextlib.suppress(Exception):  # older grpcio: no code() on the aio context
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failed:
        cancelled = getattr(context, "cancelled", None)
        return "CANCELLED" if callable(cancelled) and cancelled() else "UNKNOWN"
    return "OK"
