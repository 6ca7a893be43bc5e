"""Heartbeats a session may send: about one a second (a burst of HEARTBEAT_BURST, then
HEARTBEATS_PER_S); the others are dropped before they are checked or stored, unanswered.

An agent sends one every `heartbeat_interval_s` (10 s by default). A device that sent 62 a
second with large statuses used 0.81 of the plane's core, most of it checking each one's
bounds on the event loop (`cloud.service.bounds`, before the servicer sees it), and another
device's acks went from 1.5 to 26 ms. This interceptor sits outside the guard, so what it
drops costs its decoding only, and a session dropping FLOOD_DROPS in a second is not read
for the rest of it. Dropped heartbeats are counted and logged at most once per DROP_LOG_S per
session. A plane asking for heartbeats more often than every 2 s allows two per interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter

from cloud.service.peer import device_identity
from edge_agent.errors import Unauthenticated
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)

SESSION_METHOD = "/autoglm.v1.AgentService/Session"
HEARTBEATS_PER_S = 1.0
HEARTBEAT_BURST = 10
DROP_LOG_S = 60.0
# Heartbeats dropped within a second after which the session is not read for the rest of it:
# HTTP/2 flow control then holds the sender back, and its flood costs no decoding either.
# (An agent told to beat every 0.1 s, as some tests do, drops 9 a second and is not paused.)
FLOOD_DROPS = 20


class HeartbeatLimit(aio.ServerInterceptor):
    """Drops the heartbeats of a session beyond its allowance (event loop only)."""

    def __init__(
        self,
        heartbeat_interval_s: float,
        per_s: float = HEARTBEATS_PER_S,
        burst: int = HEARTBEAT_BURST,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.per_s = max(per_s, 2.0 / heartbeat_interval_s)
        self.burst = burst
        self.clock = clock
        self.dropped = Counter(
            "autoglm_heartbeats_dropped",
            "Heartbeats dropped unread: their session sent more than about one a second.",
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != SESSION_METHOD:
            return handler
        behavior = handler.stream_stream
        limited = self.limited

        async def session(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for reply in behavior(limited(requests, context), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(
            session,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def limited(
        self,
        requests: AsyncIterator[agent_pb2.AgentMessage],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.AgentMessage]:
        """`requests` less the heartbeats beyond the allowance (a token bucket per session)."""
        tokens, last = float(self.burst), self.clock()
        unlogged, logged_at = 0, None
        second, dropped = last, 0  # drops within the current second (see FLOOD_DROPS)
        async for message in requests:
            if message.WhichOneof("body") == "heartbeat":
                now = self.clock()
                tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
                last = now
                if tokens < 1.0:
                    self.dropped.inc()
                    unlogged += 1
                    if logged_at is None or now - logged_at >= DROP_LOG_S:
                        self._log(context, unlogged)
                        unlogged, logged_at = 0, now
                    if now - second >= 1.0:
                        second, dropped = now, 0
                    dropped += 1
                    if dropped >= FLOOD_DROPS:
                        await asyncio.sleep(max(0.0, second + 1.0 - now))
                        second, dropped = self.clock(), 0
                    continue
                tokens -= 1.0
            yield message

    def _log(self, context: aio.ServicerContext[Any, Any], dropped: int) -> None:
        try:
            device = device_identity(context)[0]
        except Unauthenticated:  # not a device (on the API port): the servicer refuses it
            device = "?"
        log.warning(
            "device %s sends heartbeats faster than %.1f a second: %d dropped unread (at most "
            "one line a minute per session)",
            device, self.per_s, dropped,
        )  # fmt: skip
