"""The running agent: site data path (ingest, inference, alerts, outbox), cloud session, and
model updates (A/B slots, shadow evaluation, swap, fall back)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import time
from pathlib import Path

from edge_agent import hostfacts
from edge_agent.bundle import Manifest, load_public_key
from edge_agent.config import AgentConfig
from edge_agent.errors import AutoglmError, LocalStateError
from edge_agent.identity import (
    DeviceIdentity,
    certificate_issuer,
    load_identity,
    replace_ca_bundle,
)
from edge_agent.metrics import AgentMetrics, MetricsServer, health_problems
from edge_agent.outbox import Outbox
from edge_agent.renewal import CertificateRenewer, finish_interrupted
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import Hardware, ServingModel, choose, open_serving
from edge_agent.session import CloudSession
from edge_agent.slots import ModelSlots, SlotInfo
from edge_agent.sync import RecordSync
from edge_agent.systemd import Notifier
from edge_agent.trust import DeviceTrust
from edge_agent.updates import OUTCOME, ModelUpdater, install_report
from protos.autoglm.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)
RESTART_RETRY_S = 30.0  # the data path tried again on the old model after both failed
RESTART_RETRY_MAX_S = 1800.0


def _name(model: ServingModel | None) -> str:
    return f"model {model.version}" if model is not None else "no model"


def _keys_unread(trust: DeviceTrust) -> str | None:
    """Why the keys trusted now may lack the one that signed an installed bundle: a signing
    root is kept here but could not be read at start (then only the key pinned at enrollment
    is trusted, until the control plane sends the root again)."""
    if trust.root is not None:
        return None
    try:
        kept = trust.path.exists()
    except OSError:
        kept = True
    if not kept:
        return None
    return f"{trust.path} could not be read, so only the key pinned at enrollment is trusted"


# Health's dropped_by_reason key: acknowledgements the outbox could not record (disk full).
ACK_WRITE_FAILED = "ack_write_failed"
OUTBOX_FILE = "outbox.sqlite3"


class Agent:
    """Owns the agent's parts and reports their state in heartbeats."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        finish_interrupted(config.state_dir)  # a certificate swap a crash cut short
        self.identity = load_identity(config.state_dir)
        self.started = time.monotonic()
        pinned = load_public_key(self.identity.signing_public_pem, "identity/signing.pub")
        self.key = DeviceTrust(config.state_dir, pinned)  # the keys bundles may be signed by
        try:
            self._follow_root_cas()  # a CA list taken just before a crash
        except AutoglmError as exc:  # the CAs held stay; the next root message retries
            log.error("the CAs of the signing root could not be kept: %s", exc)
        self.issuer = certificate_issuer(self.identity)
        self.slots = ModelSlots(config.state_dir / "models")
        self.slots.recover(self.key)  # a damaged pointer: rebuilt from the slots
        self.pending_reports: list[agent_pb2.AgentMessage] = []
        self.model = self._open_at_start()
        # A disk that is full or read-only must not keep site alerting down: the outbox then
        # starts degraded, says why (health, heartbeat) and is opened again when it can be.
        self.outbox = Outbox(
            config.state_dir / OUTBOX_FILE,
            config.outbox.max_bytes,
            reserve_bytes=config.outbox.reserve_bytes,
            degraded_ok=True,
        )
        self.device = self.identity.info.device_name
        self.client_id = config.mqtt.client_id or f"autoglm-edge-{self.device}"
        self.metrics = AgentMetrics()
        self.runtime = self._runtime(self.model)
        self.sync = RecordSync(self.outbox, config.sync.batch_records, config.sync.max_in_flight)
        self.session = CloudSession(
            self.identity,
            status=self.status,
            host=self.host,
            backoff=config.reconnect.backoff(),
            heartbeat_interval_s=config.cloud.heartbeat_interval_s,
            device_address=config.cloud.device_address,
            tls_server_name=config.cloud.tls_server_name,
            sync=self.sync,
            on_control=self._on_control,
            stop_when_refused=config.cloud.stop_when_refused,
            dead_after_s=config.cloud.dead_after_s,
            setup_timeout_s=config.cloud.setup_timeout_s,
        )
        for message in self.pending_reports:
            self.session.post(message)
        self.updater = ModelUpdater(self)
        self.metrics.watch(self)
        self.renewer = CertificateRenewer(
            config.state_dir,
            lambda: self.session.identity,
            self._renewed,
            self.session.address,
            self.session.tls_server_name,
            config.cloud.renew_at,
            config.reconnect.backoff(),
            config.cloud.renew_check_s,
        )
        self.metrics_server: MetricsServer | None = None
        self._restarting: set[asyncio.Task[None]] = set()  # the data path's restarts pending

    def status(self) -> agent_pb2.AgentStatus:
        model = self.model
        return agent_pb2.AgentStatus(
            model_name=model.manifest.name if model else "",
            model_version=model.version if model else "",
            inference_backend=model.choice.label if model else "",
            slot=self.slot(),
            signing_root_version=self.key.version,
            certificate_issuer=self.issuer,
            uptime_seconds=time.monotonic() - self.started,
            health=self.health(),
        )

    def health(self, rates_since_last: bool = True) -> agent_pb2.AgentHealth:
        """The data path's health report (`EdgeRuntime.health`), with the acknowledgements
        the outbox could not record (disk full) as `dropped_by_reason[ACK_WRITE_FAILED]`,
        beside the outbox's other disk failures (outbox_write_failed): a local disk problem,
        not an error of the agent or its model (`errors` is what a rollout's shadow gate holds
        against a model); and why the outbox cannot be written, while it cannot."""
        disk_free = hostfacts.disk_free_bytes(self.config.state_dir)
        health = self.runtime.health(disk_free, rates_since_last)
        if failures := self.sync.stats.ack_write_failures:
            health.dropped_by_reason[ACK_WRITE_FAILED] = failures
        health.outbox_unavailable = self.outbox.problem or ""
        return health

    def slot(self) -> str:
        active = self.slots.read().active
        return active.slot if active is not None and self.model is not None else ""

    def _runtime(self, model: ServingModel | None) -> EdgeRuntime:
        return EdgeRuntime(
            self.config,
            model,
            self.outbox,
            self.client_id,
            device=self.device,
            observe_batch=self.metrics.observe_batch,
        )

    def _open(self, directory: Path, partial: bool) -> ServingModel:
        return open_serving(
            directory,
            self.key,
            self.config.model,
            self.config.state_dir / "models",
            self.config.state_dir / "engines",
            partial=partial,
        )

    def _open_at_start(self) -> ServingModel | None:
        """The active slot's model; when it fails at start, the previous slot's (and a report
        saying so); the configured bundle when no slot was ever installed. A failure of the
        device is not held against the version: it is installed again when asked, and the
        report says the agent retries. The device's are `LocalStateError` (a full or
        read-only disk, an I/O error, no GPU memory for the engine) and a slot no longer as
        it was verified at install (`ModelSlots.damage`: a file damaged on disk, or keys
        that could not be read)."""
        pointer = self.slots.read()
        while pointer.active is not None:
            active = pointer.active
            try:
                return self._open(self.slots.slot_dir(active.slot), partial=True)
            except AutoglmError as exc:
                why = str(exc)
                local = isinstance(exc, LocalStateError)
                if not local and (damage := self._slot_damage(active)) is not None:
                    local, why = True, f"{exc} ({damage})"
                back = self.slots.fall_back(why, lasting=not local)
                log.error(
                    "model %s in slot %s failed at start (%s); back to %s",
                    active.version,
                    active.slot,
                    why,
                    f"{back.version} in slot {back.slot}" if back else "no model",
                )
                self.pending_reports.append(
                    install_report(
                        active.version,
                        active.rollout_id,
                        OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK,
                        f"{why}; serving {back.version if back else 'no model'}",
                        retrying=local,
                    )
                )
                pointer = self.slots.read()
        if self.config.model.bundle is not None:
            return self._open(self.config.model.bundle, partial=False)
        return None

    def _slot_damage(self, info: SlotInfo) -> str | None:
        """`ModelSlots.damage` for the slot of `info`, which failed to open at start."""

        def runs(manifest: Manifest) -> str:
            return choose(manifest, self.config.model, Hardware.detect()).variant.file

        return self.slots.damage(info, self.key, runs, _keys_unread(self.key))

    async def swap(self, model: ServingModel) -> None:
        """Serves `model` from now on: the data path restarts on it (the broker keeps the
        readings of the gap in the persistent session). When it cannot start, the data path
        restarts on the model that served before, and the error is raised."""
        old_model = self.model
        await asyncio.to_thread(self.runtime.stop)
        try:
            runtime = self._runtime(model)
            runtime.start()
        except Exception:
            self._restart(old_model, RESTART_RETRY_S)
            raise
        self.model, self.runtime = model, runtime
        if old_model is not None and old_model is not model:
            old_model.close()

    def _restart(self, model: ServingModel | None, delay: float) -> None:
        """The data path again on `model` after a failed swap. When that fails too, said as
        such, the data path runs without a model (readings still kept) and `model` is tried
        again in `delay`, then doubling up to RESTART_RETRY_MAX_S, until it serves or
        another swap comes."""
        try:
            self.runtime = self._runtime(model)
            self.runtime.start()
        except Exception as exc:  # noqa: BLE001 - never serve nothing silently
            log.error(
                "the data path cannot start again on %s after a failed swap (%s: %s): NOTHING "
                "IS SCORED; it runs without a model and tries %s again in %.0fs",
                _name(model), type(exc).__name__, exc, _name(model), delay,
            )  # fmt: skip
            self.runtime = self._runtime(None)
            try:
                self.runtime.start()
            except Exception:
                log.exception("the data path cannot start even without a model")
            self._restart_later(model, delay)
            return
        self.model = model
        log.info("the data path serves %s again", _name(model))

    def _restart_later(self, model: ServingModel | None, delay: float) -> None:
        """`_restart(model)` in `delay`, with the delay after it doubled, unless a swap
        came meanwhile."""
        runtime = self.runtime

        async def again() -> None:
            if self.runtime is not runtime or model is None:  # swapped meanwhile
                return
            await asyncio.to_thread(self.runtime.stop)
            self._restart(model, min(delay * 2, RESTART_RETRY_MAX_S))

        with contextlib.suppress(RuntimeError):  # no loop: the next swap or start serves
            loop = asyncio.get_running_loop()
            loop.call_later(delay, lambda: self._track(loop.create_task(again())))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    def _serve_metrics(self) -> None:
        """Metrics and health on `metrics.listen`; a port in use is said, not fatal (the data
        path matters more than its metrics)."""
        listen = self.config.metrics.listen
        if not listen:
            return
        try:
            self.metrics_server = MetricsServer(
                listen, self.metrics.registry, lambda: health_problems(self)
            )
        except LocalStateError as exc:
            log.error("%s; the agent runs without metrics and health endpoints", exc)
            return
        self.metrics_server.start()

    def _renewed(self, identity: DeviceIdentity) -> None:
        self.identity = identity
        self.issuer = certificate_issuer(identity)
        self.session.use_identity(identity)

    def _follow_root_cas(self) -> bool:
        """Trusts the CAs the signing root lists, when it lists any (a CA change): they
        replace `identity/ca.crt`. True when they changed."""
        root = self.key.root
        if root is None or not root.cas:
            return False
        if not replace_ca_bundle(self.config.state_dir, root.ca_bundle):
            return False
        self.identity = load_identity(self.config.state_dir)
        log.info("the control plane's CAs changed: %d trusted", len(root.cas))
        return True

    def _on_control(self, message: agent_pb2.ControlMessage) -> None:
        body = message.WhichOneof("body")
        if body == "desired":
            self.updater.want(message.desired)
        elif body == "maintenance":
            self.runtime.maintenance.replace(message.maintenance)
        elif body == "signing_root":
            try:
                self.key.take(message.signing_root.document, dt.datetime.now(dt.UTC))
            except AutoglmError as exc:  # the keys and CAs stay as they were
                log.error("signing root refused: %s", exc)
            try:
                # The CAs of the root held (new, or one whose CAs could not be written
                # before): the next session and a renewal trust them.
                if self._follow_root_cas():
                    self.session.use_identity(self.identity, reconnect=False)
            except AutoglmError as exc:
                log.error("the CAs of the signing root could not be kept: %s", exc)
        elif body == "renew_certificate":
            log.info("certificate renewal asked for: %s", message.renew_certificate.reason)
            self.renewer.renew_soon()

    def host(self) -> common_pb2.HostFacts:
        return hostfacts.collect(self.config.state_dir)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "agent %s (%s) starting; control plane %s; broker %s:%d; %d asset(s); model %s",
            self.identity.info.device_name,
            self.identity.info.device_id,
            self.session.address,
            self.config.mqtt.host,
            self.config.mqtt.port,
            len(self.config.assets),
            self.model.version if self.model else "none",
        )
        self.runtime.start()
        self._serve_metrics()
        systemd = Notifier()
        systemd.notify("READY=1")
        background = [
            asyncio.create_task(self.updater.run(stop)),
            asyncio.create_task(self.renewer.run(stop)),
            asyncio.create_task(systemd.watchdog(lambda: not health_problems(self)[0], stop)),
        ]
        try:
            await self.session.run(stop)
        finally:
            systemd.notify("STOPPING=1")
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.updater.close()
            await asyncio.to_thread(self.runtime.stop)
            self.outbox.close()
            if self.model is not None:
                self.model.close()
        log.info("agent stopped")
        if self.session.refusal is not None:
            raise type(self.session.refusal)(
                f"the control plane refused this device ({self.session.refusal}); the agent "
                "stopped. To run it again: register a revoked device anew (autoglm device "
                "register), or re-enroll one with an outdated certificate (autoglm device "
                "token NAME, then autoglm-edge enroll)"
            )


async def run_until_signalled(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)
