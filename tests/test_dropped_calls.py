"""A call that a busy server never picked up: gRPC core drops it after
`grpc.server_max_unrequested_time_in_server` and the caller sees a bare CANCELLED, which the
agents reported as such (thousands of them at 10,000 agents on one control-plane process,
`tests/benchmarks/bench_heartbeats.py`). A real grpc.aio server whose event loop is held busy."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc import aio

from cloud.service.server import SERVER_OPTIONS
from edge_agent.errors import Unavailable, from_rpc_error

METHOD = "/test.Echo/Echo"


class BusyServer:
    """A grpc.aio server on a thread of its own; `hold()` keeps its event loop busy (as a
    plane's loop is under thousands of sessions) until `release()`."""

    def __init__(self, unrequested_limit_s: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.held = threading.Event()
        self._release = threading.Event()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        options = [("grpc.server_max_unrequested_time_in_server", unrequested_limit_s)]
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(options),)
        )
        self.thread.start()
        assert self._started.wait(60), "the test server did not start within 60 s"

    async def _serve(self, options: list[tuple[str, int]]) -> None:
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
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(60)
        self.loop.close()


def test_a_call_the_busy_server_never_picked_up_is_explained() -> None:
    server = BusyServer(unrequested_limit_s=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
            assert echo(b"warm", timeout=60) == b"warm"  # connected: the calls below go at once
            server.hold()
            calls = [echo.future(b"x", timeout=120) for _ in range(3)]
            time.sleep(3.0)  # they wait unrequested 3 s, three times core's limit of 1 s
            server.release()
            for call in calls:
                call.exception(timeout=120)  # its end, whichever it is
            codes = [c.code() for c in calls]
            # One was already matched to the server's outstanding request; core drops the rest.
            assert grpc.StatusCode.CANCELLED in codes, codes
            dropped = next(c for c in calls if c.code() == grpc.StatusCode.CANCELLED)
            error = from_rpc_error(dropped, "cp:1")  # type: ignore[arg-type]
            assert isinstance(error, Unavailable), repr(error)
            assert "dropped the call without answering it" in str(error), str(error)
            assert "more control-plane workers" in str(error), str(error)
    finally:
        server.close()


def test_the_plane_names_cores_limit_and_a_locally_cancelled_call_is_not_blamed_on_it() -> None:
    assert ("grpc.server_max_unrequested_time_in_server", 30) in SERVER_OPTIONS
    server = BusyServer(unrequested_limit_s=30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
            server.hold()
            call = echo.future(b"x", timeout=120)
            call.cancel()
            server.release()
            assert call.cancelled()
            error = from_rpc_error(call, "cp:1")  # type: ignore[arg-type]
            assert not isinstance(error, Unavailable), str(error)
    finally:
        server.close()
