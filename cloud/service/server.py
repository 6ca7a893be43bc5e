"""Builds and runs the control plane's gRPC server: API port (TLS) and device port (mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cloud.alerts import AlertFeed
from cloud.artifacts import LocalArtifactStore
from cloud.catalog import ModelCatalog
from cloud.clock import utc_now
from cloud.config import CloudConfig
from cloud.devices import DeviceRegistry
from cloud.domain import DesiredModel
from cloud.leader import default_replica_id, make_elector
from cloud.outage_log import OutageLog
from cloud.presence import PresenceTracker
from cloud.profiles import DEFAULT_DIR as DEFAULT_PROFILES
from cloud.profiles import load_profiles
from cloud.rollout_rules import RolloutSettings
from cloud.rollouts import RolloutController
from cloud.service.admission import SessionAdmission
from cloud.service.agent import AgentServicer
from cloud.service.downloads import DownloadSlots
from cloud.service.enrollment import EnrollmentServicer
from cloud.service.guard import CallGuard, OperatorTokens
from cloud.service.heartbeat_limit import HeartbeatLimit
from cloud.service.maintenance_push import MaintenancePush
from cloud.service.metrics import CallMetrics, PlaneMetrics
from cloud.service.operator import OperatorServicer
from cloud.service.replacements import ReplacedSessions
from cloud.service.serde import desired_to_proto, message_to_dict
from cloud.service.session_rate import SessionRate
from cloud.service.sessions import FLEET_SLICE, SessionHub
from cloud.state_dir import ControlPlaneSecrets
from cloud.store import Store
from cloud.store.notify import ANY, DESIRED, DEVICES, ChangeListener, parse_session_topic
from cloud.webhooks import SecretBox, SenderSettings, WebhookSender
from edge_agent.errors import UNREQUESTED_LIMIT_S, LocalStateError, PermissionDenied, Unavailable
from edge_agent.waits import event_or_timeout
from protos.autoglm.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    enrollment_pb2,
    enrollment_pb2_grpc,
    operator_pb2,
    operator_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
FEED_BATCH = 500  # desired-state changes read per query of the change feed
AUDIT_PRUNE_S = 3600.0  # how often the leader deletes audit entries past retention
MAX_STREAMS_PER_CONNECTION = 1_000
PENDING_CALLS = 20_000  # calls waiting for the server to take them; see SERVER_OPTIONS
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Calls open at once on one connection. A device needs two (its session, one download);
    # the console multiplexes every signed-in browser over one connection (alert streams: 16
    # per operator at most). Each costs core memory; 100,000 let one device hold as many
    # downloads (`cloud.service.downloads` bounds those now; this bounds the rest per
    # connection). Both ports share the server's setting.
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    # BDP probing sends an HTTP/2 PING per burst on every connection to tune windows for bulk
    # transfers; for thousands of sessions of small messages it cost ~23% of the CPU per
    # heartbeat (tests/benchmarks/bench_heartbeats.py). Bulk artifact downloads may want
    # their own channel with it on.
    ("grpc.http2.bdp_probe", 0),
    # gRPC sets SO_REUSEPORT by default: a second control plane on the same port then binds
    # too, and the kernel splits connections between them (a device seen online and offline
    # on alternate calls). Off: the second one fails to start, saying so.
    ("grpc.so_reuseport", 0),
    # New calls wait in gRPC core until our Python side takes them, one per turn of its event
    # loop. Core refuses new ones at random once this many wait, and all of them at three
    # times as many, with a bare CANCELLED at once; a refused agent opens a new TLS
    # connection to retry. With core's 1,000 / 3,000, 9,897 and 10,004 setups failed when
    # 6,000 agents connected at once to one plane, and they took 128 and 127 s; with 20,000
    # they took 30 s and core refused none (tests/benchmarks/bench_heartbeats.py and its README).
    # A waiting call is a few KiB in core; arrivals over 55 s, not the fleet, bound them.
    ("grpc.server.max_pending_requests", PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 3 * PENDING_CALLS),
    # How long a call may wait there: core drops older ones (CANCELLED, explained by
    # `edge_agent/errors.py`). 55 s, under the 60 s after which an agent abandons its setup:
    # gRPC's 30 s threw away calls the plane was about to take (each retried over a new TLS
    # handshake), and much longer would spend the plane's turns on calls their agents gave up
    # (a call its agent cancelled while it waited is still handed over). Alternated 10,000-agent
    # restart storms, one process: all back 95.6 / 119.2 s with 17,656 / 18,272 failed
    # attempts at 55 s, against 106.0 / 130.5 s and 20,688 / 24,486 at 30 s (two pairs: the
    # time gained is within the 24.5 s the two 30 s runs differed by).
    ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_LIMIT_S),
]


class ControlPlane:
    """One control-plane process: the gRPC server plus its background loops."""

    def __init__(
        self,
        config: CloudConfig,
        secrets: ControlPlaneSecrets,
        store: Store,
        share_ports: bool = False,
    ) -> None:
        self.config = config
        # One of `cloud serve --workers N`: the API and device ports are bound with
        # SO_REUSEPORT, next to the other workers (cloud/service/workers.py).
        self.share_ports = share_ports
        self.secrets = secrets
        self.store = store
        self.hub = SessionHub()
        self.replica = config.replica_id or default_replica_id()  # named in session claims
        self.replaced = ReplacedSessions(store, self.hub, self.replica)  # claims, replacements
        self.presence = PresenceTracker(store, encode=message_to_dict)
        self.registry = DeviceRegistry(
            store,
            secrets.ca,
            token_ttl=dt.timedelta(seconds=config.enrollment_token_ttl_s),
            cert_validity_days=config.device_cert_validity_days,
            known_profiles=_known_profiles(config.profiles_dir),
            cert_grace=dt.timedelta(seconds=config.device_cert_grace_s),
        )
        self.artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
        self.catalog = ModelCatalog(
            store,
            self.artifacts,
            secrets.trusted_keys(),
            config.max_bundle_bytes,
        )
        self.rollouts = RolloutController(
            store,
            RolloutSettings(
                offline_after=dt.timedelta(seconds=config.offline_after_s),
                install_timeout=dt.timedelta(seconds=config.install_timeout_s),
                shadow_grace=dt.timedelta(seconds=config.shadow_grace_s),
            ),
        )
        self.alerts = AlertFeed(store)
        self.secret_box = SecretBox(secrets.key_material)
        self.webhooks = WebhookSender(
            store,
            SenderSettings(
                max_attempts=config.webhook_max_attempts,
                retry_initial_s=config.webhook_retry_initial_s,
                retry_max_s=config.webhook_retry_max_s,
                timeout_s=config.webhook_timeout_s,
                poll_s=config.webhook_poll_s,
                alertmanager_hold_s=config.alertmanager_hold_s,
                severity_rules=tuple(config.alert_severity),
            ),
            box=self.secret_box,
        )
        self.alerts.listeners.append(self.webhooks.wake)
        self.maintenance = MaintenancePush(store, self.hub)
        self.admission = SessionAdmission(config.max_session_setups)
        self._stopping = asyncio.Event()
        self.elector = make_elector(
            config.leader_election, store, config.replica_id, config.leader_lease_s
        )
        self.api_port = 0
        self.device_port = 0
        self._server: aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Woken by other replicas' changes (PostgreSQL NOTIFY) before their next poll.
        self._wake = {DESIRED: asyncio.Event(), DEVICES: asyncio.Event()}
        self._listener: ChangeListener | None = None
        self.tokens = OperatorTokens(store)  # operator tokens, cached; told of revocations
        self._health = HealthServicer()
        self._probe_server: aio.Server | None = None
        self.health_port = 0
        self.metrics = PlaneMetrics()
        self.downloads = DownloadSlots(registry=self.metrics.registry)  # artifact downloads
        self.session_rate = SessionRate(registry=self.metrics.registry)  # per device
        self.heartbeat_limit = HeartbeatLimit(  # per session, ahead of the guard's checks
            config.heartbeat_interval_s, registry=self.metrics.registry
        )
        self.webhooks.on_result = self.metrics.delivery
        self.metrics.watch_fleet(
            store,
            lambda: len(self.hub.device_ids()),
            lambda: self.elector.is_leader,
            dt.timedelta(seconds=config.offline_after_s),
        )
        self._metrics_server: Any = None
        self.metrics_port = 0
        self._console: Any = None  # cloud.console.app.ConsoleServer, when configured
        self.console_port = 0

    def endpoints(self) -> common_pb2.Endpoints:
        host = self.config.public_host
        return common_pb2.Endpoints(
            api_address=f"{host}:{self.api_port}",
            device_address=f"{host}:{self.device_port}",
            tls_server_name="" if host in self.config.hosts else self.config.hosts[0],
        )

    async def start(self) -> None:
        server = aio.server(
            interceptors=[
                CallMetrics(self.metrics),
                self.heartbeat_limit,
                CallGuard(self.tokens),
            ],
            options=[
                *(o for o in SERVER_OPTIONS if o[0] != "grpc.so_reuseport"),
                ("grpc.so_reuseport", int(self.share_ports)),
            ],
        )
        ca_pem = self.secrets.trusted_ca_pem  # both CAs during a CA change
        enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(
            EnrollmentServicer(
                self.registry, ca_pem, self.secrets.signing_public_pem, self.endpoints
            ),
            server,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                self.registry,
                self.presence,
                self.hub,
                self.config.heartbeat_interval_s,
                self.artifacts,
                self.rollouts,
                self.alerts,
                self.config.auth_recheck_interval_s,
                self.metrics,
                signing_root=self.secrets.signing_root,
                issuing_ca=self.secrets.ca,
                admission=self.admission,
                maintenance_windows=self.maintenance.windows_in_force,
                replaced=self.replaced,
                downloads=self.downloads,
                session_rate=self.session_rate,
            ),
            server,
        )
        operator_pb2_grpc.add_OperatorServiceServicer_to_server(
            OperatorServicer(
                self.registry,
                self.hub,
                dt.timedelta(seconds=self.config.offline_after_s),
                ca_pem,
                self.endpoints,
                self.catalog,
                self.rollouts,
                self.push_desired,
                self.alerts,
                secret_box=self.secret_box,
                severity_rules=tuple(self.config.alert_severity),
                max_shelve_s=self.config.max_shelve_s,
                maintenance_changed=self.push_maintenance,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        key_pair = [(self.secrets.server_key_pem, self.secrets.server_chain_pem)]
        tls = grpc.ssl_server_credentials(
            key_pair, root_certificates=ca_pem, require_client_auth=False
        )
        mtls = grpc.ssl_server_credentials(
            key_pair, root_certificates=ca_pem, require_client_auth=True
        )
        try:
            self.api_port = server.add_secure_port(self.config.api_listen, tls)
            self.device_port = server.add_secure_port(self.config.device_listen, mtls)
        except RuntimeError as exc:
            raise LocalStateError(
                f"cannot listen on {self.config.api_listen} / {self.config.device_listen}: "
                f"{exc} (is another control plane, or another program, using the port?)"
            ) from None
        # Before any session opens: a change after this is followed, one before is read at open.
        feed_start = await asyncio.to_thread(self.store.desired_revision)
        await server.start()
        self._server = server
        if self.config.health_listen:
            probe = aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, probe)
            try:
                self.health_port = probe.add_insecure_port(self.config.health_listen)
            except RuntimeError as exc:
                raise LocalStateError(
                    f"cannot listen on {self.config.health_listen}: {exc}"
                ) from None
            await probe.start()
            self._probe_server = probe
        if self.config.metrics_listen:
            self._metrics_server, self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        if self.config.console_listen:
            await self._start_console()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [
            asyncio.create_task(self._every(self.config.presence_flush_interval_s, self._flush)),
            asyncio.create_task(
                self._every(
                    self.config.auth_recheck_interval_s, self._recheck_sessions, self._wake[DEVICES]
                )
            ),
            asyncio.create_task(self._every(self.config.rollout_interval_s, self._reconcile)),
            asyncio.create_task(
                self._every(
                    self.config.desired_poll_interval_s,
                    self._desired_feed(feed_start),
                    self._wake[DESIRED],
                )
            ),
            asyncio.create_task(self._every(AUDIT_PRUNE_S, self._prune_audit)),
            asyncio.create_task(self.metrics.watch_loop(self._stopping)),
            asyncio.create_task(self.webhooks.run(self._stopping)),
            asyncio.create_task(self.maintenance.run(self._stopping)),
            asyncio.create_task(self.elector.run(self._stopping)),
        ]
        loop = asyncio.get_running_loop()

        def heard(topic: str) -> None:  # the listener's thread
            loop.call_soon_threadsafe(self._woken, topic)

        self._listener = self.store.change_listener(heard)
        if self._listener is not None:
            self._listener.start()
        log.info(
            "control plane serving: api port %d (TLS), device port %d (mutual TLS)",
            self.api_port,
            self.device_port,
        )

    async def stop(self, grace: float = 2.0) -> None:
        self._stopping.set()  # the elector hands its lease back on the way out
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(grace)
        if self._probe_server is not None:
            await self._probe_server.stop(0)
        if self._console is not None:
            await self._console.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush()

    async def _start_console(self) -> None:
        """The web console, a client of this replica's own API port (aiohttp is loaded only
        here: a control plane without a console does not need it)."""
        from cloud.console.api import OperatorApi
        from cloud.console.app import ConsoleServer
        from cloud.console.sessions import SessionSeal

        host = self.config.api_listen.rpartition(":")[0].strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        target = f"[{host}]:{self.api_port}" if ":" in host else f"{host}:{self.api_port}"
        api = OperatorApi(target, self.secrets.trusted_ca_pem, self.config.hosts[0])
        console = ConsoleServer(
            self.config.console_listen,
            api,
            SessionSeal(self.secrets.key_material),
            self.config.console_trusted_proxies,
        )
        await console.start()
        self._console = console
        self.console_port = console.port

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def _flush(self) -> None:
        await asyncio.to_thread(self.presence.flush)

    def push_maintenance(self) -> None:
        """Windows changed through this replica: to the agents now, and alerts whose
        window was removed delivered (event loop only)."""
        self.maintenance.changed()
        self.webhooks.wake(sweep=True)

    def push_desired(self, desired: Sequence[DesiredModel]) -> None:
        """Sends changed desired states down the open sessions this replica holds (event loop
        only): the fast path for changes made here. Changes made on any replica reach every
        replica through the change feed (`_desired_feed`); a device offline now gets its
        desired state in its next session's first messages."""
        for d in desired:
            message = agent_pb2.ControlMessage(desired=desired_to_proto(d))
            self.hub.send_desired(d.device_id, d.revision, message)

    def _desired_feed(self, start: int) -> Callable[[], Awaitable[None]]:
        """Follows the store's desired-state revisions and delivers each change to the
        sessions this replica holds, whichever replica made it (the rollout leader, an
        operator's abort through another replica)."""
        cursor = start

        async def desired_feed() -> None:
            nonlocal cursor
            while True:
                changes = await asyncio.to_thread(self.store.desired_after, cursor, FEED_BATCH)
                if not changes:
                    return
                self.push_desired([d for d in changes if self.hub.is_open(d.device_id)])
                cursor = changes[-1].revision
                if len(changes) < FEED_BATCH:
                    return

        return desired_feed

    async def _prune_audit(self) -> None:
        days = self.config.audit_retention_days
        if days and self.elector.is_leader:
            before = utc_now() - dt.timedelta(days=days)
            removed = await asyncio.to_thread(self.store.prune_audit, before)
            if removed:
                log.info("audit log: %d entries older than %g days deleted", removed, days)

    async def _reconcile(self) -> None:
        if self.elector.is_leader:
            self.push_desired(await asyncio.to_thread(self.rollouts.tick))

    async def _recheck_sessions(self) -> None:
        """Ends the sessions held here of devices revoked, deleted or re-enrolled through any
        replica (this replica ends its own revocations at once): each session's certificate
        is compared with the device's current one in the store. And those a newer session of
        their device replaced on another replica (at once when its notification came)."""
        since = time.monotonic()
        ids = self.hub.device_ids()
        if not ids:
            return
        current = await asyncio.to_thread(self.store.device_credentials, ids, utc_now())
        stale = PermissionDenied("this device was revoked or re-enrolled; its certificate is stale")
        ended = 0
        for start in range(0, len(ids), FLEET_SLICE):  # the loop gets a turn between slices
            if start:
                await asyncio.sleep(0)
            ended += self.hub.end_stale(ids[start : start + FLEET_SLICE], current, stale, since)
        if ended:
            log.info("ended %d session(s) of revoked or re-enrolled devices", ended)
        # Last: its failure (logged by `_every`) must not skip the revocations above.
        await self.replaced.check(ids)

    def _woken(self, topic: str) -> None:
        """Another replica changed `topic` (event loop only)."""
        if (session := parse_session_topic(topic)) is not None:
            self.replaced.heard(*session)
            return
        self.tokens.heard(topic)  # an operator revoked (or anything): its cached token goes
        for name, event in self._wake.items():
            if topic in (name, ANY):
                event.set()

    @staticmethod
    async def _every(
        interval_s: float, job: Callable[[], Awaitable[None]], wake: asyncio.Event | None = None
    ) -> None:
        """`job` every `interval_s`, and at once when `wake` is set."""
        name = getattr(job, "__name__", repr(job)).strip("_").replace("_", " ")
        outage = OutageLog(log, f"background job {name}")
        while True:
            if wake is None:
                await asyncio.sleep(interval_s)
            else:
                await event_or_timeout(wake, interval_s)
                wake.clear()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:  # the database away: a line now and then, no traceback
                outage.failed(exc, interval_s)
            except Exception:
                log.exception("background job %s failed; retrying in %.1fs", name, interval_s)
            else:
                outage.worked()


def _known_profiles(directory: Path | None) -> frozenset[str] | None:
    """Profile names from `directory`, or from the checkout's profiles when none is set;
    None (any profile accepted) when neither exists."""
    if directory is None:
        if not DEFAULT_PROFILES.is_dir():
            return None
        directory = DEFAULT_PROFILES
    return frozenset(load_profiles(directory))
