"""OPC UA in: one thread per server runs an asyncua client session that subscribes to the
configured nodes (data-change notifications) and hands each value, stamped with its source
timestamp (else the server's, else now), to the same queue as MQTT ingest.

Security: `None` for labs, or `Basic256Sha256` with `Sign` or `SignAndEncrypt` and the
agent's certificate and key (the server's certificate pinned when given). A lost session
(the server restarts, the network) is opened again after the project's jittered backoff and
its subscription made again. A value with a bad status code, or one that is not a number or a
boolean, is counted as a drop (`opcua_bad_status`, `bad_type`); nothing here stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.config import OpcUaSource
from edge_agent.errors import ConfigError
from edge_agent.ingest.decode import Decoded, Decoder, TopicRoutes, plausible_time, value_reason
from edge_agent.retry import Backoff

log = logging.getLogger(__name__)
OPCUA_DROPS = (
    "opcua_unreachable",  # no session: counted once per failed attempt
    "opcua_bad_status",  # a notification whose status code is not Good
)
# asyncua logs every refused connection and lost session at warning level; the source counts
# them and logs once a minute per reason. Its errors (a handler that raised) still show.
logging.getLogger("asyncua").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Target:
    asset: int
    sensor: int  # schema slot; -1: unknown (counted)
    node_id: str


class OpcUaSession:
    """One server's subscription, in its own thread and event loop."""

    def __init__(
        self,
        source: OpcUaSource,
        targets: Sequence[Target],
        base: Decoder,
        deliver: Callable[[Decoded], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.targets: dict[str, list[Target]] = {}  # by node id as asyncua writes it
        for t in targets:
            self.targets.setdefault(t.node_id, []).append(t)
        self.base = base
        self.deliver = deliver
        self.clock = clock
        self.backoff = Backoff(0.5, 30.0)
        self.sessions = 0  # opened so far
        self.notifications = 0
        self.subscribed = threading.Event()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"opcua {source.endpoint}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """Its thread, for the liveness probe (a thread that died takes readiness with it)."""
        return self._thread

    def stop(self) -> None:
        """Ends the session (also one still opening) and waits for its thread."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(task.cancel)
        if self._thread.is_alive():
            self._thread.join(self.source.timeout_s + 10)

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._task = loop.create_task(self._run())
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            loop.close()

    async def _run(self) -> None:
        from asyncua.client.client import Client

        while not self._stopping.is_set():
            lost = self._lost = asyncio.Event()
            client = Client(self.source.endpoint, timeout=self.source.timeout_s)
            try:
                await self._open(client, lost)
                self.backoff.reset()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: counted, tried again
                self.base.drop("opcua_unreachable", self.source.endpoint, repr(exc).encode())
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):  # it is gone either way
                    await asyncio.wait_for(client.disconnect(), self.source.timeout_s)
            if not self._stopping.is_set():
                await asyncio.sleep(self.backoff.next_delay())

    async def _open(self, client: Any, lost: asyncio.Event) -> None:
        from asyncua import ua
        from asyncua.crypto import security_policies

        source = self.source
        if source.username:
            client.set_user(source.username)
            client.set_password(source.password)
        if source.security != "None":
            assert source.certificate is not None and source.private_key is not None
            client.application_uri = source.application_uri
            await client.set_security(
                security_policies.SecurityPolicyBasic256Sha256,
                certificate=str(source.certificate),
                private_key=str(source.private_key),
                server_certificate=str(source.server_certificate)
                if source.server_certificate
                else None,
                mode=getattr(ua.MessageSecurityMode, source.mode),
            )

        async def on_lost(exc: Exception) -> None:
            log.warning("OPC UA session with %s lost (%s); opening it again", source.endpoint,
                        exc)  # fmt: skip
            lost.set()

        client.connection_lost_callback = on_lost
        await client.connect()
        self.sessions += 1
        subscription = await client.create_subscription(source.publishing_interval_ms, self)
        nodes = [client.get_node(node_id) for node_id in self.targets]
        handles = await subscription.subscribe_data_change(
            nodes,
            queuesize=source.queue_size,
            sampling_interval=float(source.publishing_interval_ms),  # not a PLC's fastest
        )
        refused = [n for n, h in zip(self.targets, handles, strict=True)
                   if isinstance(h, ua.StatusCode)]  # fmt: skip
        if refused:
            log.error("OPC UA %s refused node(s) %s", source.endpoint, ", ".join(refused))
        log.info("OPC UA session with %s open: %d node(s) subscribed", source.endpoint,
                 len(nodes) - len(refused))  # fmt: skip
        self.subscribed.set()

    # ---- asyncua's subscription handler (its event loop) ----
    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.notifications += 1
        try:
            for target in self.targets.get(node.nodeid.to_string(), ()):
                self._take(target, val, data.monitored_item.Value)
        except Exception as exc:  # noqa: BLE001 - a value it could not read: counted
            self.base.drop("bad_type", self.source.endpoint, repr(exc)[:120].encode())

    def _take(self, target: Target, val: Any, value: Any) -> None:
        where = self.source.endpoint
        if value.StatusCode is not None and not value.StatusCode.is_good():
            self.base.drop("opcua_bad_status", where, str(value.StatusCode).encode())
            return
        if target.sensor < 0:
            self.base.drop("unknown_sensor", where, target.node_id.encode())
            return
        if isinstance(val, bool) or type(val) in (int, float):
            reading = float(val)
        else:
            self.base.drop("bad_type", where, repr(val)[:120].encode())
            return
        reason = value_reason(reading)
        if reason:
            self.base.drop(reason, where, target.node_id.encode())
            return
        now = self.clock()
        # The source's time, else the server's, else now. A stamp outside 1970-2100 is no
        # time (servers send 1601-01-01, OPC UA's minimum, for "not set"): the next one counts.
        stamps = [
            stamp.replace(tzinfo=dt.UTC).timestamp()
            for stamp in (value.SourceTimestamp, value.ServerTimestamp)
            if stamp is not None
        ]
        usable = [t for t in stamps if plausible_time(t)]
        if stamps and not usable:
            self.base.drop("bad_timestamp", where, target.node_id.encode())
            return
        ts = usable[0] if usable else now
        latest, earliest = self.base.bounds(target.asset, now)
        # Its offset counts, kept or not (as MQTT's and Sparkplug's): a server clock running
        # ahead is followed after a few values instead of every value dropped as future.
        self.base.observe(target.asset, ts, now, target.sensor)
        if ts > latest or ts < earliest:
            self.base.drop("ts_future" if ts > latest else "ts_past", where, b"")
            return
        self.base.accepted += 1
        self.deliver((target.asset, target.sensor, ts, reading))

    def status_change_notification(self, status: Any) -> None:
        """The server ended the subscription (shutdown, timeout): the session is opened again."""
        log.warning("OPC UA subscription status on %s: %s", self.source.endpoint, status)
        code = getattr(status, "Status", None)
        if code is not None and not code.is_good() and self._lost is not None:
            self._lost.set()


def sessions(
    assets: Sequence[object],
    routes: TopicRoutes,
    base: Decoder,
    deliver: Callable[[Decoded], None],
) -> list[OpcUaSession]:
    """One session per server the assets name (assets may share a server, with the same
    settings; a node may feed several assets)."""
    by_server: dict[str, tuple[OpcUaSource, list[Target]]] = {}
    for i, asset in enumerate(assets):
        source: OpcUaSource | None = getattr(asset, "opcua", None)
        if source is None:
            continue
        from asyncua import ua  # only agents with OPC UA sources load it

        first, targets = by_server.setdefault(source.endpoint, (source, []))
        if first.model_dump(exclude={"nodes"}) != source.model_dump(exclude={"nodes"}):
            raise ConfigError(
                f"assets: {source.endpoint} is given twice with different settings (security, "
                "certificates, intervals): give it the same ones"
            )
        for n in source.nodes:
            try:
                node_id = ua.NodeId.from_string(n.node_id).to_string()
            except Exception as exc:  # noqa: BLE001 - asyncua raises several kinds
                raise ConfigError(
                    f"asset {getattr(asset, 'name', i)!r}: OPC UA node id {n.node_id!r} does not "
                    f"parse ({exc})"
                ) from None
            targets.append(Target(i, routes.sensor(i, n.sensor), node_id))
    return [OpcUaSession(src, targets, base, deliver) for src, targets in by_server.values()]
