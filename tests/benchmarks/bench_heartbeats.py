"""Heartbeats one control-plane process sustains with M concurrent agent sessions (real
mutual TLS, the agent's real CloudSession), next to a raw unary gRPC ping over TLS measured
in the same run against a bare server process.

    python tests/benchmarks/bench_heartbeats.py [--scenarios 1000@0.2,1000@10,5000@10]

The control plane runs as its own process (`autoglm cloud serve`); all agents run in this
process on one event loop. A scenario M@I runs M agents that each send a heartbeat every
I seconds (open loop: offered load = M / I); the window is at least two intervals. Prints
one line per scenario and a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent.identity import DeviceIdentity  # noqa: E402
from edge_agent.retry import Backoff  # noqa: E402
from edge_agent.session import CloudSession  # noqa: E402
from protos.autoglm.v1 import agent_pb2, common_pb2  # noqa: E402
from tests.benchmarks.fleet import (  # noqa: E402
    enroll_fleet,
    percentile,
    process_cpu_s,
    spawn,
    start_plane_process,
    stop,
)

PING = "/bench.Ping/Ping"


# ---- the raw baseline: a bare aio server with one unary method, same TLS certificate ----
async def _ping_server(state: Path, ports_file: Path) -> None:
    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(_pong)}
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [((state / "server.key").read_bytes(), (state / "server.crt").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    ports_file.write_text(json.dumps({"port": port}))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


async def _pong(request: bytes, context: object) -> bytes:
    return request


async def ping_baseline(
    port: int, ca_pem: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    """Closed loop: `concurrency` callers on one channel, each pinging as fast as it can."""
    creds = grpc.ssl_channel_credentials(ca_pem)
    async with aio.secure_channel(f"localhost:{port}", creds) as channel:
        ping = channel.unary_unary(PING)
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


# ---- the system under test ----
async def run_sessions(
    identities: list[DeviceIdentity], interval: float, seconds: float, server_pid: int
) -> dict[str, float]:
    status = agent_pb2.AgentStatus(model_version="1", inference_backend="onnxruntime-cpu")
    host = common_pb2.HostFacts(hostname="bench", arch="x86_64", cpu_count=2)
    sessions = [
        CloudSession(
            ident,
            status=lambda: status,
            host=lambda: host,
            backoff=Backoff(0.5, 5),
            heartbeat_interval_s=interval,
        )
        for ident in identities
    ]
    stop = asyncio.Event()
    start = time.monotonic()
    tasks = [asyncio.create_task(s.run(stop)) for s in sessions]
    while sum(s.connected for s in sessions) < len(sessions):
        if time.monotonic() - start > 120:
            break
        await asyncio.sleep(0.05)
    connect_s = time.monotonic() - start
    connected = sum(s.connected for s in sessions)
    await asyncio.sleep(min(interval * 1.5, 15))  # warm-up: every session has sent a beat
    for s in sessions:
        s.stats.ack_latencies_s.clear()
    acked_before = sum(s.stats.heartbeats_acked for s in sessions)
    server_cpu, client_cpu = process_cpu_s(server_pid), time.process_time()
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    server_cpu = process_cpu_s(server_pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    acked = sum(s.stats.heartbeats_acked for s in sessions) - acked_before
    latencies = [x for s in sessions for x in s.stats.ack_latencies_s]
    stop.set()
    await asyncio.gather(*tasks)
    return {
        "agents": len(sessions),
        "connected": connected,
        "connect_s": connect_s,
        "offered_per_s": len(sessions) / interval,
        "acked_per_s": acked / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "reconnects": sum(s.stats.sessions_opened for s in sessions) - len(sessions),
        "server_cpu_share": server_cpu / elapsed,  # 1.0 = one core busy all the window
        "client_cpu_share": client_cpu / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default="100@0.1,1000@0.2,1000@10,5000@10",
        help="comma-separated AGENTS@INTERVAL_SECONDS",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="shortest measurement window")
    parser.add_argument("--ping-concurrency", type=int, default=100)
    parser.add_argument(
        "--ping-server", nargs=2, metavar=("STATE", "PORTS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.ping_server:
        asyncio.run(_ping_server(Path(args.ping_server[0]), Path(args.ping_server[1])))
        return 0

    scenarios = [(int(m), float(i)) for m, i in (x.split("@") for x in args.scenarios.split(","))]
    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    env_note = f"{os.cpu_count()} cores; client: this process (1 event loop); server: own process"
    print(f"heartbeat benchmark ({env_note})")
    plane = start_plane_process(work)  # idle while the baseline runs
    results = []
    try:
        ping_ports = work / "ping.json"
        ping = spawn(
            [sys.executable, __file__, "--ping-server", str(plane.state), str(ping_ports)],
            ping_ports,
            work / "ping.log",
        )
        try:
            port = json.loads(ping_ports.read_text())["port"]
            ping_run = ping_baseline(port, plane.ca_pem, args.ping_concurrency, args.seconds)
            base = asyncio.run(ping_run)
        finally:
            stop(ping)
        print(
            f"raw unary gRPC ping (TLS, {args.ping_concurrency} concurrent): "
            f"{base['per_s']:.0f}/s  p50 {base['p50_ms']:.2f} ms  p99 {base['p99_ms']:.2f} ms"
        )
        enrolled: list[DeviceIdentity] = []
        for m, interval in scenarios:
            t0 = time.monotonic()
            if m > len(enrolled):
                enrolled += enroll_fleet(plane, len(enrolled), m - len(enrolled))
            enroll_s = time.monotonic() - t0
            window = max(args.seconds, 2 * interval)
            res = asyncio.run(run_sessions(enrolled[:m], interval, window, plane.proc.pid))
            res["enroll_s"] = enroll_s
            res["ratio_vs_ping"] = res["acked_per_s"] / base["per_s"]
            results.append(res)
            print(
                f"M={m:5d}: connected {res['connected']}/{m} in {res['connect_s']:.1f}s; "
                f"offered {res['offered_per_s']:.0f}/s, acked {res['acked_per_s']:.0f}/s "
                f"({res['ratio_vs_ping']:.2f}x raw ping); p50 {res['p50_ms']:.1f} ms, "
                f"p99 {res['p99_ms']:.1f} ms; reconnects {res['reconnects']}; "
                f"CPU cores busy: server {res['server_cpu_share']:.2f}, "
                f"agents {res['client_cpu_share']:.2f}"
            )
    finally:
        plane.stop()
    print(json.dumps({"baseline_ping": base, "heartbeats": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
