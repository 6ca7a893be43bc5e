"""Calls a busy server has not taken yet. gRPC core refuses new ones while too many wait
(`grpc.server.max_pending_requests`) and drops those that waited too long
(`grpc.server_max_unrequested_time_in_server`); the caller sees a bare CANCELLED, which the
agents reported as such (thousands of them when thousands of agents connect at once,
`tests/benchmarks/bench_heartbeats.py`). A real grpc.aio server whose event loop is held busy."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from grpc import aio

from cloud.service.server import MAX_STREAMS_PER_CONNECTION, PENDING_CALLS, SERVER_OPTIONS
from edge_agent.config import CloudLink
from edge_agent.errors import UNREQUESTED_LIMIT_S, Unavailable, from_rpc_error
from edge_agent.session import SETUP_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
METHOD = "/test.Echo/Echo"


class BusyServer:
    """A grpc.aio server on a thread of its own; `hold()` keeps its event loop busy (as a
    plane's loop is under thousands of sessions) until `release()`."""

    def __init__(self, options: list[tuple[str, Any]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.held = threading.Event()
        self._release = threading.Event()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(options,), daemon=True)
        self.thread.start()
        self._started.wait(60)
        if self._stop is None:  # not serving
            self.close()
            raise AssertionError(f"the test server did not start within 60 s: {self.failure!r}")

    def _run(self, options: list[tuple[str, Any]]) -> None:
        try:
            self.loop.run_until_complete(self._serve(options))
        except Exception as exc:  # said by the constructor, which waits on it
            self.failure = exc
            self._started.set()
            raise

    async def _serve(self, options: list[tuple[str, Any]]) -> None:
        async def echo(request: bytes, context: object) -> bytes:
            return request

        server = aio.server(options=options)
        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await server.stop(None)

    def hold(self) -> None:
        def busy() -> None:
            self.held.set()
            self._release.wait(120)

        self.loop.call_soon_threadsafe(busy)
        assert self.held.wait(60), "the server's loop did not run the hold within 60 s"

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the test server did not stop within 60 s"
        self.loop.close()


def test_a_call_the_busy_server_never_picked_up_is_explained() -> None:
    server = BusyServer([("grpc.server_max_unrequested_time_in_server", 1)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
            assert echo(b"warm", timeout=60) == b"warm"  # connected: the calls below go at once
            server.hold()
            calls = [echo.future(b"x", timeout=120) for _ in range(3)]
            time.sleep(6.0)  # they wait unrequested 6 s, six times core's limit of 1 s
            server.release()
            for call in calls:
                call.exception(timeout=120)  # its end, whichever it is
            codes = [c.code() for c in calls]
            # One was already matched to the server's outstanding request; core drops the rest.
            assert grpc.StatusCode.CANCELLED in codes, codes
            dropped = next(c for c in calls if c.code() == grpc.StatusCode.CANCELLED)
            failure = dropped.exception()
            assert isinstance(failure, grpc.RpcError), repr(failure)
            error = from_rpc_error(failure, "cp:1")
            assert isinstance(error, Unavailable), repr(error)
            assert "ended the call without an answer" in str(error), str(error)
            assert "too busy to take it" in str(error), str(error)
    finally:
        server.close()


def _burst(server: BusyServer, count: int, wait_s: float) -> tuple[list[grpc.StatusCode], float]:
    """`count` calls sent while the server is held; released once one of them has ended
    (core refused it) or after `wait_s`. Their codes, and how long until the release."""
    # Four connections (channels alike share one otherwise), each under the plane's streams
    # per connection (`MAX_STREAMS_PER_CONNECTION`): agents connect one by one.
    channels = [
        grpc.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(4)
    ]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=60)
        server.hold()
        t0 = time.monotonic()
        echoes: list[grpc.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(METHOD) for channel in channels
        ]
        calls = [echoes[i % 4].future(b"x", timeout=300) for i in range(count)]
        while time.monotonic() - t0 < wait_s and not any(c.done() for c in calls):
            time.sleep(0.05)
        held_s = time.monotonic() - t0
        server.release()
        for call in calls:
            call.exception(timeout=300)
        return [c.code() for c in calls], held_s
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.unit
def test_core_drops_a_waiting_call_before_its_agent_abandons_the_setup() -> None:
    """A call core has not handed over by then is dropped just before its agent would give it
    up: dropped later, the plane would take calls no one waits for any more."""
    limit = dict(SERVER_OPTIONS)["grpc.server_max_unrequested_time_in_server"]
    assert limit == UNREQUESTED_LIMIT_S
    configured = CloudLink.model_fields["setup_timeout_s"].default
    assert 30 < limit < min(SETUP_TIMEOUT_S, configured), limit


def test_a_burst_of_new_calls_waits_for_the_busy_plane_instead_of_being_refused() -> None:
    """Core's defaults refuse calls once 1,000 wait (6,000 agents connecting at once to one
    plane: 9,897 refused attempts, 128 s to connect); the plane's options let them wait."""
    assert PENDING_CALLS > 3_000
    count = 3_000
    assert count // 4 < MAX_STREAMS_PER_CONNECTION  # spread over _burst's four connections
    server = BusyServer([])  # gRPC's defaults
    try:
        codes, held_s = _burst(server, count, wait_s=120)
    finally:
        server.close()
    refused = codes.count(grpc.StatusCode.CANCELLED)
    assert refused > 0, f"core's defaults refused none of {count} calls held {held_s:.1f} s"
    # The plane's options, but calls may wait 10 minutes: this is about how many may wait,
    # not how long (a slow machine takes the 3,000 slowly once released).
    unrequested = "grpc.server_max_unrequested_time_in_server"
    options = [o for o in SERVER_OPTIONS if o[0] != unrequested] + [(unrequested, 600)]
    server = BusyServer(options)
    try:
        # Twice as long as the defaults took to refuse one, and at least 5 s.
        codes, _ = _burst(server, count, wait_s=max(5.0, 2 * held_s))
    finally:
        server.close()
    assert codes.count(grpc.StatusCode.OK) == count, (
        f"with the plane's options {codes.count(grpc.StatusCode.CANCELLED)} of {count} calls "
        f"were refused (core's defaults: {refused})"
    )
