"""The heartbeat benchmark's raw baseline: a bare grpc.aio server with one unary method on
the control plane's TLS certificate (its own process), and a closed-loop client of it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from grpc import aio

from tests.benchmarks.fleet import percentile, serve_raw_until_sigterm

PING = "/bench.Ping/Ping"


async def serve_ping(state: Path, ports_file: Path) -> None:
    """The baseline's server (server-side TLS only) until SIGTERM; its port to `ports_file`."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(_pong)}
    )
    await serve_raw_until_sigterm(state, ports_file, handler, client_auth=False)


async def _pong(request: bytes, context: object) -> bytes:
    return request


async def ping_baseline(
    port: int, ca_pem: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    """Closed loop: `concurrency` callers on one channel, each pinging as fast as it can."""
    creds = grpc.ssl_channel_credentials(ca_pem)
    async with aio.secure_channel(f"localhost:{port}", creds) as channel:
        ping: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PING)
        await ping(b"x" * 64)
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < deadline:
                start = time.monotonic()
                await ping(b"x" * 64)
                latencies.append(time.monotonic() - start)

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }
