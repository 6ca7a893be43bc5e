"""AgentService over mutual TLS: the device session stream (hello, heartbeats, record
batches, install and shadow reports) and artifact downloads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from cloud.alerts import AlertFeed
from cloud.artifacts import ArtifactStore
from cloud.catalog import assigned_artifacts
from cloud.clock import utc_now
from cloud.devices import DeviceRegistry
from cloud.domain import DesiredModel, DeviceRecord
from cloud.maintenance import MaintenanceWindow
from cloud.pki import CertificateAuthority
from cloud.presence import PresenceTracker
from cloud.rollouts import RolloutController
from cloud.service.admission import DEFAULT_SETUP_LIMIT, SessionAdmission
from cloud.service.downloads import DownloadSlots, read_chunk
from cloud.service.ended_calls import cut
from cloud.service.enrollment import AttemptLimiter
from cloud.service.maintenance_push import maintenance_message
from cloud.service.metrics import PlaneMetrics
from cloud.service.peer import certificate_not_after, device_identity, issued_by
from cloud.service.records import store_batch
from cloud.service.replacements import ReplacedSessions
from cloud.service.serde import (
    desired_to_proto,
    install_report_from_proto,
    shadow_report_from_proto,
)
from cloud.service.session_rate import SessionRate
from cloud.service.sessions import END_OF_STREAM, LiveSession, SessionHub
from edge_agent.errors import AutoglmError, InvalidInput, PermissionDenied, Unavailable
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
RENEWALS_PER_HOUR = 12
DOWNLOAD_CHUNK = 1 << 20
MAX_DOWNLOAD_CHUNK = (4 << 20) - (64 << 10)  # a chunk and its header fit the 4 MiB default cap
MIN_DOWNLOAD_CHUNK = 16 << 10  # smaller chunks cost the server a message per few bytes
STORE_AHEAD = 2  # record batches of a session read while the one before is stored


HELLO_TIMEOUT_S = 30.0  # an agent sends its hello at once; a silent stream is dropped


# A session refused before its hello was read (busy, revoked, unknown, the store failing) is
# answered once the hello has arrived, or after this long. An agent writes its hello as soon
# as the call starts; a refusal that ends the call while that write is under way reaches it as
# grpc.aio's "Internal error from Core" (the failed write is marked INTERNAL, the refusal's
# status and its retry hint are dropped): 37 of 400 refused calls did on this project's
# machine, hellos written 0-10 ms after the call began. Read first, the hello's write has
# finished before the refusal is sent. At most REFUSALS_WAITING calls wait so at once (an
# admitted call waits up to HELLO_TIMEOUT_S for its hello); beyond that, refused at once.
# Refused calls' durations in the call metrics include this wait.
REFUSAL_HELLO_WAIT_S = 5.0
REFUSALS_WAITING = 1_000

# A session the plane ended (replaced by a newer one, its queue full, revoked) has this long
# to write what was queued before its end and then its status. A device that does not read
# its stream leaves gRPC's write of an earlier message waiting for HTTP/2 window it never
# grants, and the error never reached that write: the session stayed registered, with its
# reader, until the connection dropped. Past this, the status is handed to gRPC (it goes out
# behind what the device has not read, once it reads, or goes with the call when the device
# leaves or its deadline passes) and the call's task is cancelled: the session is released.
ENDED_DRAIN_S = 5.0


async def _await_hello(request_iterator: AsyncIterator[agent_pb2.AgentMessage]) -> None:
    """Lets the hello arrive, at most REFUSAL_HELLO_WAIT_S; what came, or an error, is
    ignored: the call is being refused."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(anext(aiter(request_iterator), None), REFUSAL_HELLO_WAIT_S)


async def _hello(request_iterator: AsyncIterator[agent_pb2.AgentMessage]) -> agent_pb2.Hello:
    """The session's first message, which must be a hello, within HELLO_TIMEOUT_S."""
    try:
        first = await asyncio.wait_for(anext(aiter(request_iterator), None), HELLO_TIMEOUT_S)
    except TimeoutError:
        raise InvalidInput(
            f"no hello within {HELLO_TIMEOUT_S:.0f} s of opening a session"
        ) from None
    if first is None or first.WhichOneof("body") != "hello":
        raise InvalidInput("a session must start with a hello message")
    return first.hello


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        registry: DeviceRegistry,
        presence: PresenceTracker,
        hub: SessionHub,
        heartbeat_interval_s: float,
        artifacts: ArtifactStore,
        rollouts: RolloutController,
        alerts: AlertFeed,
        auth_recheck_interval_s: float = 5.0,
        metrics: PlaneMetrics | None = None,
        signing_root: bytes = b"",
        issuing_ca: CertificateAuthority | None = None,
        admission: SessionAdmission | None = None,
        maintenance_windows: Callable[[], list[MaintenanceWindow]] | None = None,
        replica: str = "",
        replaced: ReplacedSessions | None = None,
        downloads: DownloadSlots | None = None,
        session_rate: SessionRate | None = None,
    ) -> None:
        self.metrics = metrics or PlaneMetrics()
        self.admission = admission or SessionAdmission(DEFAULT_SETUP_LIMIT)
        self._refusals_waiting = 0  # see REFUSALS_WAITING
        self.session_rate = session_rate or SessionRate()  # sessions per device and minute
        self.signing_root = signing_root  # sent before desired state: it may need the new key
        # After a CA change, devices whose certificate another CA issued renew at once.
        self.issuing_ca_pem = issuing_ca.cert_pem if issuing_ca is not None else b""
        # Renewals per device and hour: enough for retries after lost answers.
        self.renewals = AttemptLimiter(
            max_failures=RENEWALS_PER_HOUR, window_s=3600.0, what="certificate renewals"
        )
        self.alerts = alerts
        self.auth_recheck_interval_s = auth_recheck_interval_s
        self.registry = registry
        self.presence = presence
        self.hub = hub
        self.heartbeat_interval_s = heartbeat_interval_s
        self.store = registry.store
        # Claims each session opened (`replica`: this replica's id, named in the claims).
        self.replaced = replaced or ReplacedSessions(self.store, hub, replica)
        # The maintenance windows in force (any thread): the plane's shared recent read.
        self.maintenance_windows = maintenance_windows or (
            lambda: self.store.list_maintenance(utc_now(), False)
        )
        self.artifacts = artifacts
        self.downloads = downloads or DownloadSlots()
        self.rollouts = rollouts
        self._background: set[asyncio.Task[None]] = set()  # see ENDED_DRAIN_S

    async def RenewCertificate(
        self,
        request: agent_pb2.RenewCertificateRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> agent_pb2.RenewCertificateResponse:
        device_id, fingerprint = device_identity(context)
        self.renewals.check(device_id)  # a device renewing in a loop is refused, not served
        self.renewals.failed(device_id)  # counts every renewal, not only failed ones
        cert = await asyncio.to_thread(
            self.registry.renew, device_id, fingerprint, bytes(request.csr_pem)
        )
        log.info(
            "device %s renewed its certificate: serial %s, valid until %s",
            device_id,
            cert.serial,
            f"{cert.not_after:%Y-%m-%d %H:%M}Z",
        )
        response = agent_pb2.RenewCertificateResponse(certificate_chain_pem=cert.chain_pem)
        response.not_after.FromDatetime(cert.not_after)
        return response

    async def DownloadArtifact(
        self,
        request: agent_pb2.DownloadArtifactRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        device_id, fingerprint = device_identity(context)
        # RateLimited past a few at once, before any query (see `cloud.service.downloads`);
        # counted until the call ends, cancelled or not: its done callback gives it back.
        download = self.downloads.open_for(device_id)
        done = lambda _: self.downloads.release(download)  # noqa: E731
        context.add_done_callback(done)  # type: ignore[arg-type]  # (the stubs want a class)
        try:
            device = await asyncio.to_thread(self.registry.authenticate, device_id, fingerprint)
            assigned = await asyncio.to_thread(assigned_artifacts, self.store, device)
            if request.digest not in assigned:
                raise PermissionDenied(
                    f"artifact {request.digest[:23]}… is not part of a model version assigned "
                    f"to device '{device.name}'"
                )
            if request.chunk_size and not request.chunk_size >= MIN_DOWNLOAD_CHUNK:
                raise InvalidInput(
                    f"chunk_size: {request.chunk_size} bytes; ask for 0 (the default, "
                    f"{DOWNLOAD_CHUNK}) or at least {MIN_DOWNLOAD_CHUNK}"
                )
            total = self.artifacts.size(request.digest)
            if request.offset > total:
                raise InvalidInput(f"offset {request.offset} is past the end ({total} bytes)")
            chunk = min(request.chunk_size or DOWNLOAD_CHUNK, MAX_DOWNLOAD_CHUNK)
            await self.downloads.admit(download, chunk)  # waits for room across the plane
            self.downloads.progressed(download)
            # Sent apart from the first chunk: a stalled download's status can then go out
            # behind that chunk (with it, its batch would still hold the metadata op).
            await context.send_initial_metadata(())
            if (task := asyncio.current_task()) is not None:
                self.downloads.watch(download, context, task)
            offset = request.offset
            checked = time.monotonic()
            while offset < total:
                if time.monotonic() - checked > self.auth_recheck_interval_s:
                    # Revoked or re-enrolled since the download began: it stops here.
                    await asyncio.to_thread(self.registry.authenticate, device_id, fingerprint)
                    checked = time.monotonic()
                size = min(chunk, total - offset)
                # Read in a thread, the file open only meanwhile; the chunk is not kept here
                # while gRPC writes it.
                yield await asyncio.to_thread(
                    read_chunk, self.artifacts, request.digest, offset, size, total
                )
                self.downloads.progressed(download)
                offset += size
        finally:
            self.downloads.release(download)

    async def Session(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ControlMessage]:
        device_id, fingerprint = device_identity(context)
        setup = self.metrics.session_setup
        started = time.monotonic()
        counted = False
        # (A peer without a device certificate is refused above, before any wait: the device
        # port's TLS asks for one, so only a broken client gets there.)
        try:
            with self.admission.setup():  # RateLimited, with a retry hint, when too many open
                # RateLimited too when this device opened too many lately (no query, no log).
                self.session_rate.take(device_id)
                counted = True
                # Who it is first: a revoked or unknown peer is refused before its state is read.
                device, last_stored = await asyncio.to_thread(self._known, device_id, fingerprint)
        except Exception as exc:
            if counted and isinstance(exc, Unavailable):  # the plane's store, not the device
                self.session_rate.refund(device_id)
            if self._refusals_waiting < REFUSALS_WAITING:
                self._refusals_waiting += 1
                try:
                    await _await_hello(request_iterator)  # see REFUSAL_HELLO_WAIT_S
                finally:
                    self._refusals_waiting -= 1
            raise
        setup.labels("lookup").observe(time.monotonic() - started)
        started = time.monotonic()
        hello = await _hello(request_iterator)
        setup.labels("hello").observe(time.monotonic() - started)
        started = time.monotonic()
        with self.admission.setup():
            try:
                if device.cert_not_after is None and (expiry := certificate_not_after(context)):
                    # Enrolled before expiry was recorded: learnt from the certificate it shows.
                    await asyncio.to_thread(
                        self.store.record_cert_expiry, device.id, fingerprint, expiry
                    )
                # The device's next generation fleet-wide: a replica holding an older session
                # of it ends that one (`cloud.session_claims`); one held here ends now. Open
                # before the desired state is read: a change made meanwhile is pushed to it.
                live = await self.replaced.open(device.id, fingerprint, context.peer())
            except Unavailable:  # the plane's store: not counted against the device
                self.session_rate.refund(device_id)
                raise
            # Online once it holds a session (no await since): a claim that failed (the store
            # away, the device deleted meanwhile) leaves it as it was.
            self.presence.seen(
                device.id,
                agent_version=hello.agent_version,
                status=hello.status,
                host=hello.host,
            )
            try:
                desired, windows = await asyncio.to_thread(self._to_send, device.id)
            except BaseException as exc:
                if isinstance(exc, Unavailable):  # the plane's store: not counted
                    self.session_rate.refund(device_id)
                self.hub.remove(live)
                if not self.hub.is_open(device.id):
                    self.presence.closed(device.id)
                raise
        setup.labels("state").observe(time.monotonic() - started)
        log.info("session opened: %s (%s) agent %s", device.name, device.id, hello.agent_version)
        live.reader = asyncio.create_task(self._read(live, request_iterator))
        release = functools.partial(self._release, live, device)
        live.on_end = functools.partial(
            self._watch_end, live, context, asyncio.current_task(), release
        )
        if live.ending is not None:  # replaced or revoked while it was set up
            live.on_end()
        try:
            yield agent_pb2.ControlMessage(
                accepted=agent_pb2.SessionAccepted(
                    device_id=device.id,
                    device_name=device.name,
                    heartbeat_interval_seconds=self.heartbeat_interval_s,
                    last_stored_sequence=last_stored,
                )
            )
            if self.signing_root:
                yield agent_pb2.ControlMessage(
                    signing_root=agent_pb2.SigningRoot(document=self.signing_root)
                )
            if self.issuing_ca_pem and not issued_by(context, self.issuing_ca_pem):
                yield agent_pb2.ControlMessage(
                    renew_certificate=agent_pb2.CertificateRenewal(
                        reason="the control plane's CA changed: the certificate is renewed "
                        "under the new one"
                    )
                )
            if desired is not None and desired.revision >= live.desired_revision:
                live.desired_revision = desired.revision
                yield agent_pb2.ControlMessage(desired=desired_to_proto(desired))
            # Always, if empty: it replaces what the agent kept (windows removed meanwhile).
            maintenance = maintenance_message(windows, device.labels)
            live.maintenance = maintenance.SerializeToString(deterministic=True)
            yield maintenance
            while True:
                item = await live.outbound.get()
                if item is END_OF_STREAM:
                    return
                if isinstance(item, AutoglmError):
                    if isinstance(item, Unavailable):  # the plane's store failed: not counted
                        self.session_rate.refund(device_id)
                    raise item
                assert isinstance(item, agent_pb2.ControlMessage)
                yield item
        finally:
            release()

    def _release(self, live: LiveSession, device: DeviceRecord) -> None:
        """Forgets a session whose stream ended or was cut (once): its reader stops and the
        hub drops it."""
        if live.released.is_set():
            return
        live.released.set()
        if live.reader is not None:
            live.reader.cancel()
        self.hub.remove(live)
        if not self.hub.is_open(device.id):
            self.presence.closed(device.id)
        log.info("session closed: %s (%s)", device.name, device.id)

    def _watch_end(
        self,
        live: LiveSession,
        context: aio.ServicerContext[Any, Any],
        call: asyncio.Task[Any] | None,
        release: Callable[[], None],
    ) -> None:
        """The plane ended the session: its call is watched (see ENDED_DRAIN_S)."""
        if call is None:  # not run by gRPC's server: nothing to cut
            return
        watch = asyncio.create_task(self._cut_when_stalled(live, context, call, release))
        self._background.add(watch)
        watch.add_done_callback(self._background.discard)

    async def _cut_when_stalled(
        self,
        live: LiveSession,
        context: aio.ServicerContext[Any, Any],
        call: asyncio.Task[Any],
        release: Callable[[], None],
    ) -> None:
        """Gives an ended session's call ENDED_DRAIN_S to finish; one still writing then
        (what was queued before the end, or its status) is cut."""
        done, _ = await asyncio.wait({call}, timeout=ENDED_DRAIN_S)
        if done:
            return
        error = live.ending
        assert error is not None  # watched once it is set
        log.warning(
            "session of device %s ended (%s) but has not taken what was sent for %g s: it "
            "does not read its stream; the session is released and its status waits for the "
            "device to read",
            live.device_id, error.grpc_code.name, ENDED_DRAIN_S,
        )  # fmt: skip
        cut(context, call, error, self._background)
        release()

    def _known(self, device_id: str, fingerprint: str) -> tuple[DeviceRecord, int]:
        """The device, if it may act, and its last stored record (one trip to a thread)."""
        device = self.registry.authenticate(device_id, fingerprint)
        return device, self.store.last_record_sequence(device.id)

    def _to_send(self, device_id: str) -> tuple[DesiredModel | None, list[MaintenanceWindow]]:
        """What a new session gets first: its desired model and the maintenance periods."""
        return self.store.get_desired(device_id), self.maintenance_windows()

    async def _read(
        self, live: LiveSession, request_iterator: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        """Handles what the agent sends after its hello; answers go through `live`.

        Record batches are stored by a task of their own, in order, while the next ones are
        read (at most `STORE_AHEAD` waiting): reading and decoding a batch overlaps storing
        the previous one."""
        unhandled: set[str] = set()
        batches: asyncio.Queue[agent_pb2.RecordBatch | None] = asyncio.Queue(STORE_AHEAD)
        storer = asyncio.create_task(self._store_batches(live, batches))
        try:
            async for message in request_iterator:
                if live.ending is not None:  # its answers would not be sent: read no more
                    return
                kind = message.WhichOneof("body")
                if kind == "heartbeat":
                    self.metrics.heartbeats.inc()
                    self.presence.seen(live.device_id, status=message.heartbeat.status)
                    live.send(
                        agent_pb2.ControlMessage(
                            heartbeat_ack=agent_pb2.HeartbeatAck(seq=message.heartbeat.seq)
                        )
                    )
                elif kind == "records":
                    if storer.done():  # storing failed: the session has been ended
                        return
                    await batches.put(message.records)
                elif kind == "install":
                    await asyncio.to_thread(
                        self.rollouts.on_install,
                        live.device_id,
                        install_report_from_proto(message.install),
                    )
                elif kind == "shadow":
                    await asyncio.to_thread(
                        self.rollouts.on_shadow,
                        live.device_id,
                        shadow_report_from_proto(message.shadow),
                    )
                elif kind == "hello":
                    live.end(InvalidInput("hello may only be sent once per session"))
                    return
                elif kind not in unhandled:  # once per session: newer agents may send more
                    unhandled.add(str(kind))
                    log.warning(
                        "device %s sent %s, which this control plane does not handle yet",
                        live.device_id,
                        kind,
                    )
            await batches.put(None)
            if await storer:
                live.finish()
        except asyncio.CancelledError:
            raise
        except AutoglmError as exc:  # a bad batch, the store unavailable: the agent retries
            log.warning("session of %s ended: %s", live.device_id, exc)
            live.end(exc)
        except (grpc.RpcError, aio.AbortError, ConnectionError) as exc:  # the agent went away
            log.debug("session reader of %s ended: %s", live.device_id, exc)
            live.finish()
        except Exception:  # a bug: say so loudly, end this session only
            log.exception("internal error in the session of %s; ending it", live.device_id)
            live.finish()
        finally:
            storer.cancel()

    async def _store_batches(
        self, live: LiveSession, batches: asyncio.Queue[agent_pb2.RecordBatch | None]
    ) -> bool:
        """Stores a session's batches in order and acknowledges each; False when storing
        failed (the session has been ended with the reason)."""
        try:
            while (batch := await batches.get()) is not None:
                ack, alerts_changed = await asyncio.to_thread(
                    store_batch, self.store, live.device_id, batch, utc_now()
                )
                live.send(agent_pb2.ControlMessage(batch_ack=ack))
                counted = self.metrics.records
                counted.labels("stored").inc(ack.stored)
                counted.labels("duplicate").inc(ack.duplicates)
                counted.labels("rejected").inc(len(ack.rejected))
                if alerts_changed:
                    self.alerts.notify()
        except AutoglmError as exc:  # a bad batch, the store unavailable: the agent retries
            log.warning("session of %s ended: %s", live.device_id, exc)
            live.end(exc)
            return False
        except Exception:  # a bug: say so loudly, end this session only
            log.exception("internal error in the session of %s; ending it", live.device_id)
            live.finish()
            return False
        return True
