"""The agent's session with the control plane: one mutual-TLS stream, heartbeats, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from edge_agent import __version__
from edge_agent.enroll import channel_options
from edge_agent.errors import (
    AutoglmError,
    InvalidInput,
    RateLimited,
    Unavailable,
    from_rpc_error,
)
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from edge_agent.session_end import SessionEnd
from edge_agent.session_end import classify as classify_end
from edge_agent.sync import Outgoing, RecordSync
from edge_agent.waits import event_or_timeout
from protos.autoglm.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)
DEAD_AFTER_S = 15.0
SETUP_TIMEOUT_S = 60.0
# A session that lasted this long resets the reconnect backoff: one the plane (or a flapping
# link) ends within seconds is a failure like any other, and the next waits longer. Reset at
# acceptance, a plane ending each session at once had the agent back every ~1 s, 10 a minute,
# and then refused as reconnecting too often (`cloud.service.session_rate`).
STABLE_AFTER_S = 30.0
LATENCY_SAMPLES = 4096
SESSION_METHOD = "/autoglm.v1.AgentService/Session"


def _serialize(message: Outgoing) -> bytes:
    """The session's messages; record batches come already serialized (`edge_agent.sync`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass
class SessionStats:
    """Counters a person (or a benchmark) reads to see how the link is doing."""

    sessions_opened: int = 0
    attempts_failed: int = 0  # session attempts that ended before or after opening
    busy_refusals: int = 0  # attempts the control plane refused as too busy (with a hint)
    not_reading_ends: int = 0  # sessions the plane ended: this agent did not read its stream
    replaced: int = 0  # sessions ended by a newer session of this device
    heartbeats_sent: int = 0
    heartbeats_acked: int = 0
    refused: bool = False  # the control plane refused this device (revoked, stale certificate)
    last_error: str = ""
    ack_latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


class CloudSession:
    """Keeps a session open: hello, heartbeats at the interval the control plane asks for,
    reconnects with jittered exponential backoff. Never raises out of `run`."""

    def __init__(
        self,
        identity: DeviceIdentity,
        status: Callable[[], agent_pb2.AgentStatus],
        host: Callable[[], common_pb2.HostFacts],
        backoff: Backoff,
        heartbeat_interval_s: float = 0.0,
        device_address: str = "",
        tls_server_name: str = "",
        on_control: Callable[[agent_pb2.ControlMessage], None] | None = None,
        sync: RecordSync | None = None,
        stop_when_refused: bool = False,
        dead_after_s: float = DEAD_AFTER_S,
        setup_timeout_s: float = SETUP_TIMEOUT_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.identity = identity
        self.status = status
        self.host = host
        self.backoff = backoff
        self.heartbeat_interval_s = heartbeat_interval_s
        self.address = device_address or identity.info.device_address
        self.tls_server_name = tls_server_name or identity.info.tls_server_name
        self.on_control = on_control
        self.sync = sync
        self.stop_when_refused = stop_when_refused
        # Nothing heard from the control plane this long ends the session: a partition that
        # drops packets without a reset looked alive for 40 s and more. Half of it silent, a
        # heartbeat goes out early as a probe.
        self.dead_after_s = dead_after_s
        # Connecting, the TLS handshake, the hello and the plane's answer together. Longer
        # than `dead_after_s`: a fleet reconnecting at once queues handshakes at the control
        # plane; an agent that gives up on a queued one throws its work away and queues
        # again, and at 5,000 agents on one plane that fed on itself until none got in
        # (tests/benchmarks/bench_heartbeats.py --storm).
        self.setup_timeout_s = setup_timeout_s
        self.stable_after_s = stable_after_s
        self._last_heard = 0.0
        # Why the control plane refused this device, when that ended the sessions for good.
        self.refusal: AutoglmError | None = None
        self.retry_hint_s = 0.0  # when the control plane said to come back, for the next wait
        self.stats = SessionStats()
        self.connected = False
        # Heartbeats sent and not answered yet, (seq, sent at) oldest first. The plane answers
        # in order: an answer to one means those before it were dropped, and they go; so do
        # those older than `dead_after_s` (the path is judged by then). Bounded, and the
        # oldest is the heartbeat that waits for its answer now.
        self._sent_at: deque[tuple[int, float]] = deque()
        # Reports (install, shadow) wait here until a session is open to carry them.
        self._outgoing: deque[agent_pb2.AgentMessage] = deque(maxlen=256)
        self._outgoing_ready = asyncio.Event()
        self._restart = asyncio.Event()  # end the open session and reconnect now

    def post(self, message: agent_pb2.AgentMessage) -> None:
        """Queues a report; sent in order on this session or the next one."""
        self._outgoing.append(message)
        self._outgoing_ready.set()

    async def _post_loop(self, send: Callable[[agent_pb2.AgentMessage], Awaitable[None]]) -> None:
        while True:
            self._outgoing_ready.clear()
            while self._outgoing:
                await send(self._outgoing[0])
                self._outgoing.popleft()
            await self._outgoing_ready.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Runs sessions until `stop` is set."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except AutoglmError as exc:
                if isinstance(exc, Unavailable) and ("TLS" in str(exc) or "certif" in str(exc)):
                    clock = self.identity.clock_problem(dt.datetime.now(dt.UTC))
                    if clock:  # the likely cause, said first
                        exc = Unavailable(f"{clock} ({exc})")
                self.stats.attempts_failed += 1
                self.stats.last_error = str(exc)
                if isinstance(exc, RateLimited) and exc.retry_after_s > 0:
                    self.retry_hint_s = exc.retry_after_s  # whatever the reason, it is followed
                if self._ended(exc) and self.stop_when_refused:
                    self.refusal = exc
                    return
            except Exception as exc:  # a bug must not end the agent's sessions
                self.stats.attempts_failed += 1
                self.stats.last_error = str(exc)
                log.exception("session to %s failed unexpectedly; reconnecting", self.address)
            if stop.is_set():
                break
            if self._restart.is_set():
                self._restart.clear()
                log.info("reconnecting with the renewed certificate")
                continue
            delay = self._retry_delay()
            log.info("reconnecting in %.1fs", delay)
            await event_or_timeout(stop, delay)

    def _ended(self, exc: AutoglmError) -> bool:
        """Counts and logs why the session ended or was refused; True when the control
        plane refused this device (retrying soon cannot help)."""
        kind = classify_end(exc)
        if kind is SessionEnd.REFUSED:
            self.stats.refused = True
            self.backoff.exhaust()
            log.error("the control plane refused this device: %s", exc)
            return True
        if kind is SessionEnd.BUSY:  # expected in a reconnect storm
            self.stats.busy_refusals += 1
            log.info(
                "session to %s refused for now (the control plane is busy): %s", self.address, exc
            )
        elif kind is SessionEnd.NOT_READING:
            # Not the plane's load: this agent fell behind reading what the plane sent.
            self.stats.not_reading_ends += 1
            log.warning(
                "the control plane at %s ended this session because this agent did not read "
                "its stream (the plane's queue for this device filled): this agent is too "
                "slow (a blocked event loop, a starved host), the plane is not overloaded; "
                "reconnecting: %s",
                self.address,
                exc,
            )
        elif kind is SessionEnd.REPLACED:
            self.stats.replaced += 1
            log.warning(
                "session to %s ended: a newer session of this device opened; if this repeats, "
                "another agent runs with this device's identity (a cloned image: enroll each "
                "device on its own): %s",
                self.address,
                exc,
            )
        else:
            log.warning("session to %s ended: %s", self.address, exc)
        return False

    def _retry_delay(self) -> float:
        """The wait before the next attempt: the control plane's retry hint when it sent one
        (too busy to open the session, or this device's sessions keep replacing one
        another; spread +-50 % so the agents it told do not return together), the backoff
        otherwise."""
        hint, self.retry_hint_s = self.retry_hint_s, 0.0
        if hint > 0:
            return self.backoff.after_hint(hint)
        return self.backoff.next_delay()

    def credentials(self) -> grpc.ChannelCredentials:
        return self.identity.credentials()

    def use_identity(self, identity: DeviceIdentity, reconnect: bool = True) -> None:
        """New credentials (a renewed certificate): the open session ends cleanly and the
        next one opens at once with them (event loop only). `reconnect=False` (new trusted
        CAs only): the open session goes on, the next one uses them."""
        self.identity = identity
        if reconnect:
            self._restart.set()

    async def _session(self, stop: asyncio.Event) -> None:
        self._restart.clear()  # this session opens with the credentials there are now
        options = channel_options(self.tls_server_name)
        async with aio.secure_channel(self.address, self.credentials(), options=options) as channel:
            call = channel.stream_stream(
                SESSION_METHOD,
                request_serializer=_serialize,
                response_deserializer=agent_pb2.ControlMessage.FromString,
            )()
            reader: asyncio.Task[None] | None = None
            sender: asyncio.Task[None] | None = None
            poster: asyncio.Task[None] | None = None
            opened_at: float | None = None
            lock = asyncio.Lock()  # one write at a time on the stream

            async def send(message: Outgoing) -> None:
                async with lock:
                    try:
                        await call.write(message)
                    except asyncio.InvalidStateError:  # the stream ended under this write
                        if reader is not None and reader.done() and not reader.cancelled():
                            error = reader.exception()
                            if isinstance(error, grpc.RpcError):
                                raise from_rpc_error(error, self.address) from None
                        raise Unavailable(f"{self.address}: the session stream ended") from None

            try:
                hello = agent_pb2.Hello(
                    agent_version=__version__,
                    status=self.status(),
                    host=self.host(),
                    last_acked_sequence=self.sync.acked if self.sync else 0,
                )
                first = await self._open(call, hello, stop)
                if first is None:
                    return  # stopping while the session opened
                if not isinstance(first, agent_pb2.ControlMessage) or not first.HasField(
                    "accepted"
                ):
                    raise InvalidInput("the control plane did not accept the session")
                accepted = first.accepted
                self._last_heard = time.monotonic()
                self.connected = True
                self.stats.sessions_opened += 1
                opened_at = self._last_heard  # the backoff resets once it has lasted
                interval = self.heartbeat_interval_s or accepted.heartbeat_interval_seconds or 10.0
                log.info(
                    "session open as %s; heartbeat every %.1fs", accepted.device_name, interval
                )
                reader = asyncio.create_task(self._read(call))
                poster = asyncio.create_task(self._post_loop(send))
                if self.sync is not None:
                    await self.sync.on_accepted(accepted.last_stored_sequence)
                    sender = asyncio.create_task(self.sync.run(send))
                await self._heartbeats(send, interval, stop, reader, sender)
                if reader.done():
                    reader.result()  # the server ended the stream: raise its status
                else:
                    await call.done_writing()
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, self.address) from None
            finally:
                self.connected = False
                self._sent_at.clear()
                if opened_at is not None and time.monotonic() - opened_at >= self.stable_after_s:
                    self.backoff.reset()
                if poster is not None:
                    poster.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                        await poster
                if sender is not None and not sender.done():
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                        await sender
                if reader is not None and not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                        await reader
                elif reader is not None and not reader.cancelled():
                    reader.exception()  # retrieved: reported through the session's error

    async def _open(
        self,
        call: aio.StreamStreamCall[Outgoing, agent_pb2.ControlMessage],
        hello: agent_pb2.Hello,
        stop: asyncio.Event,
    ) -> object | None:
        """The control plane's answer to the hello within `setup_timeout_s` (a path that dies
        while the session opens must not hang it); None when `stop` is set first, so that
        an agent told to stop does not wait out the setup timeout."""
        answer = asyncio.ensure_future(self._hello(call, hello))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {answer, stopping},
                timeout=self.setup_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopping.cancel()
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await answer  # its error, if any, is not the session's: it was given up
        if answer in done:
            return answer.result()  # an RpcError is mapped by the session
        if stopping in done:
            return None
        raise Unavailable(
            f"{self.address}: no answer to the session's hello within {self.setup_timeout_s:g}s"
        )

    @staticmethod
    async def _hello(
        call: aio.StreamStreamCall[Outgoing, agent_pb2.ControlMessage], hello: agent_pb2.Hello
    ) -> object:
        # The plane may have ended the call first (refused it): then read raises its status.
        with contextlib.suppress(asyncio.InvalidStateError):
            await call.write(agent_pb2.AgentMessage(hello=hello))
        return await call.read()

    async def _heartbeats(
        self,
        send: Callable[[agent_pb2.AgentMessage], Awaitable[None]],
        interval: float,
        stop: asyncio.Event,
        reader: asyncio.Task[None],
        sender: asyncio.Task[None] | None,
    ) -> None:
        seq = 0
        stopping = asyncio.create_task(stop.wait())
        restarting = asyncio.create_task(self._restart.wait())
        watched = {stopping, restarting, reader} | ({sender} if sender is not None else set())
        probe_after = self.dead_after_s / 2
        tick = min(interval, probe_after / 2)
        last_beat = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait(
                    watched, timeout=tick, return_when=asyncio.FIRST_COMPLETED
                )
                if sender is not None and sender in done:
                    sender.result()  # a failed write ends the session with its error
                if done:
                    return
                now = time.monotonic()
                silent = now - self._last_heard
                # Dead: silent past the bound while a heartbeat has waited a while for its
                # answer (a slow but living control plane is not a dead path).
                while self._sent_at and now - self._sent_at[0][1] > self.dead_after_s:
                    self._sent_at.popleft()
                waited = now - self._sent_at[0][1] if self._sent_at else 0.0
                if silent > self.dead_after_s and waited >= self.dead_after_s / 3:
                    raise Unavailable(
                        f"{self.address}: nothing heard for {silent:.0f}s "
                        f"(cloud.dead_after_s {self.dead_after_s:g}); the path is dead"
                    )
                due = now - last_beat >= interval
                # Regular heartbeats rarer than half the bound: probe when it has been quiet.
                probe = interval > probe_after and silent >= probe_after
                probe = probe and now - last_beat >= probe_after
                if not (due or probe):
                    continue
                seq += 1
                last_beat = now
                self._sent_at.append((seq, now))
                beat = agent_pb2.Heartbeat(seq=seq, status=self.status())
                beat.sent_at.GetCurrentTime()
                try:  # a write stuck on a dead path must not stall the watchdog
                    await asyncio.wait_for(
                        send(agent_pb2.AgentMessage(heartbeat=beat)), self.dead_after_s
                    )
                except TimeoutError:
                    raise Unavailable(
                        f"{self.address}: a heartbeat could not be written for "
                        f"{self.dead_after_s:g}s; the path is dead"
                    ) from None
                self.stats.heartbeats_sent += 1
        finally:
            stopping.cancel()
            restarting.cancel()

    async def _read(self, call: aio.StreamStreamCall[Outgoing, agent_pb2.ControlMessage]) -> None:
        while True:
            message = await call.read()
            if not isinstance(message, agent_pb2.ControlMessage):
                return  # EOF: the control plane closed the stream cleanly
            self._last_heard = time.monotonic()
            if message.WhichOneof("body") == "heartbeat_ack":
                acked = message.heartbeat_ack.seq
                while self._sent_at and self._sent_at[0][0] < acked:  # dropped: never answered
                    self._sent_at.popleft()
                if self._sent_at and self._sent_at[0][0] == acked:
                    sent = self._sent_at.popleft()[1]
                    self.stats.heartbeats_acked += 1
                    self.stats.ack_latencies_s.append(time.monotonic() - sent)
            elif message.WhichOneof("body") == "batch_ack" and self.sync is not None:
                self.sync.on_ack(message.batch_ack)
            elif self.on_control is not None:
                self.on_control(message)
