"""Prediction sync into the store: the agent's outbox drained through its real session and
RecordSync to the control plane storing in SQLite (or PostgreSQL), next to a raw gRPC client
stream of messages of the same size (~100 B) over the same mutual TLS, in the same run.

    python tests/benchmarks/bench_sync.py [--records 100000] [--rounds 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Baseline: a bare aio server in its own process whose client-streaming method only counts
what arrives, and an aio client in this process streaming one serialized prediction per
message. Ours: `--records` predictions appended to a real `Outbox` before the clock starts
(appending is the inference side's cost, not the sync's), then the agent's `CloudSession`
with `RecordSync` until the control plane (`autoglm cloud serve`, its own process) has
acknowledged the last one. Each round alternates baseline and ours; a fresh device per round
(sequence numbers are per device). Records per wall second and per CPU-second, the CPU of
both processes summed (client: this process, all threads; server: /proc of its process).
With --postgres (an admin DSN), a throwaway database on that server is created for the
control plane and dropped afterwards. Medians over rounds are printed, with the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent.config import SyncPolicy  # noqa: E402
from edge_agent.identity import DeviceIdentity  # noqa: E402
from edge_agent.outbox import PREDICTION, Outbox  # noqa: E402
from edge_agent.retry import Backoff  # noqa: E402
from edge_agent.session import CloudSession  # noqa: E402
from edge_agent.sync import RecordSync  # noqa: E402
from protos.autoglm.v1 import agent_pb2, common_pb2  # noqa: E402
from tests.benchmarks.fleet import (  # noqa: E402
    enroll_fleet,
    process_cpu_s,
    serve_raw_until_sigterm,
    spawn,
    start_plane_process,
    stop,
)

COUNT = "/bench.Sink/Count"
SENSORS = ("Current", "Pressure", "Flow", "Temperature")
T0 = 1_790_000_000.0


def prediction(i: int) -> bytes:
    """A prediction as the agent's outbox keeps it (`edge_agent.wire.prediction_record`)."""
    record = agent_pb2.Record(
        prediction=agent_pb2.Prediction(
            asset=f"pump-{i % 16}",
            score=0.25 + (i % 97) / 100,
            anomalous=i % 50 == 0,
            model_version="3",
            contributions={s: round(0.1 + k / 10 + (i % 7) / 100, 4) for k, s in
                           enumerate(SENSORS)},
        )
    )  # fmt: skip
    record.prediction.window_start.FromNanoseconds(int((T0 + i - 32) * 1e9))
    record.prediction.window_end.FromNanoseconds(int((T0 + i) * 1e9))
    return record.SerializeToString()


# ---- the raw baseline: a bare aio server with one client-streaming method that counts ----
async def _count(requests: AsyncIterator[bytes], context: object) -> bytes:
    n = 0
    async for _ in requests:
        n += 1
    return str(n).encode()


async def _sink_server(state: Path, ports_file: Path) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Count": grpc.stream_unary_rpc_method_handler(_count)}
    )
    await serve_raw_until_sigterm(state, ports_file, handler)


async def _raw_stream(port: int, identity: DeviceIdentity, messages: list[bytes]) -> int:
    async def requests() -> AsyncIterator[bytes]:
        for m in messages:
            yield m

    async with aio.secure_channel(f"localhost:{port}", identity.credentials()) as channel:
        count: aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(COUNT)
        answer = await count(requests())
        return int(answer)


def raw_round(port: int, pid: int, identity: DeviceIdentity, n: int) -> dict[str, float]:
    messages = [prediction(i) for i in range(n)]
    server_cpu, cpu, wall = process_cpu_s(pid), time.process_time(), time.perf_counter()
    counted = asyncio.run(_raw_stream(port, identity, messages))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu + process_cpu_s(pid) - server_cpu
    if counted != n:
        raise SystemExit(f"the sink counted {counted} of {n} messages")
    return {"records": n, "wall_s": wall, "cpu_s": cpu}


# ---- ours: outbox -> CloudSession/RecordSync -> control plane -> store ----
async def _drain(identity: DeviceIdentity, sync: RecordSync, last: int) -> None:
    stop_event = asyncio.Event()
    session = CloudSession(
        identity,
        status=lambda: agent_pb2.AgentStatus(),
        host=lambda: common_pb2.HostFacts(hostname="bench"),
        backoff=Backoff(0.2, 2),
        heartbeat_interval_s=10,
        sync=sync,
    )
    task = asyncio.create_task(session.run(stop_event))
    while sync.stats.acked_up_to < last:
        if task.done() or session.stats.last_error:
            raise SystemExit(f"the session failed: {session.stats.last_error}")
        await asyncio.sleep(0.005)
    stop_event.set()
    await task


def sync_round(
    pid: int,
    identity: DeviceIdentity,
    n: int,
    box_path: Path,
    args: argparse.Namespace,
    backends: Backends | None,
) -> dict[str, float]:
    outbox = Outbox(box_path, 1 << 30)
    for first in range(0, n, 10_000):
        outbox.append([(PREDICTION, prediction(i)) for i in range(first, min(n, first + 10_000))])
    sync = RecordSync(outbox, args.batch, args.in_flight)
    db_before = backends.cpu() if backends else {}
    server_cpu, cpu, wall = process_cpu_s(pid), time.process_time(), time.perf_counter()
    asyncio.run(_drain(identity, sync, n))
    wall = time.perf_counter() - wall
    agent_cpu = time.process_time() - cpu
    server_cpu = process_cpu_s(pid) - server_cpu
    db_cpu = Backends.spent(db_before, backends.cpu()) if backends else 0.0
    stats = outbox.stats()
    outbox.close()
    if stats.depth or sync.stats.stored != n:
        raise SystemExit(f"stored {sync.stats.stored} of {n}; {stats.depth} left in the outbox")
    return {
        "records": n,
        "wall_s": wall,
        "cpu_s": agent_cpu + server_cpu + db_cpu,
        "agent_cpu_s": agent_cpu,
        "plane_cpu_s": server_cpu,
        "postgres_cpu_s": db_cpu,
    }


def _postgres_database(admin_dsn: str) -> tuple[str, str]:
    import psycopg

    name = f"autoglm_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop_database(admin_dsn: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Backends:
    """CPU seconds of the PostgreSQL server processes serving the control plane's database
    (they do part of the storing): the backends connected to it, read from /proc."""

    def __init__(self, admin_dsn: str, database: str) -> None:
        import psycopg

        self.conn = psycopg.connect(admin_dsn, autocommit=True)
        self.database = database

    def cpu(self) -> dict[int, float]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.database,),
        ).fetchall()
        out = {}
        for (pid,) in rows:
            with contextlib.suppress(OSError):  # gone meanwhile
                out[pid] = process_cpu_s(pid)
        return out

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _median(runs: list[dict[str, float]], per: str) -> float:
    return statistics.median(r["records"] / r[per] for r in runs)


def _ratios(ours: list[dict[str, float]], raw: list[dict[str, float]], per: str) -> float:
    pairs = zip(ours, raw, strict=True)
    return statistics.median((a["records"] / a[per]) / (b["records"] / b[per]) for a, b in pairs)


def run(args: argparse.Namespace, work: Path, database_url: str) -> dict[str, Any]:
    plane = start_plane_process(work, database_url=database_url)
    backends = Backends(args.postgres, database_url.rsplit("/", 1)[1]) if database_url else None
    try:
        identities = enroll_fleet(plane, 0, args.rounds + 1)
        ports = work / "sink.json"
        command = [sys.executable, __file__, "--sink-server", str(plane.state), str(ports)]
        sink = spawn(command, ports, work / "sink.log")
        try:
            port = json.loads(ports.read_text())["port"]
            raw_round(port, sink.pid, identities[-1], 2000)  # warm-up: imports, TLS, caches
            raw: list[dict[str, float]] = []
            ours: list[dict[str, float]] = []
            for r in range(args.rounds):
                raw.append(raw_round(port, sink.pid, identities[-1], args.raw_records))
                box = work / f"outbox-{r}.sqlite3"
                ours.append(
                    sync_round(plane.proc.pid, identities[r], args.records, box, args, backends)
                )
                print(
                    f"round {r + 1}: raw {raw[-1]['records'] / raw[-1]['cpu_s']:,.0f}/CPU-s "
                    f"({raw[-1]['records'] / raw[-1]['wall_s']:,.0f}/s), ours "
                    f"{ours[-1]['records'] / ours[-1]['cpu_s']:,.0f}/CPU-s "
                    f"({ours[-1]['records'] / ours[-1]['wall_s']:,.0f}/s; CPU s: agent "
                    f"{ours[-1]['agent_cpu_s']:.2f}, control plane {ours[-1]['plane_cpu_s']:.2f}"
                    f", postgres {ours[-1]['postgres_cpu_s']:.2f})",
                    flush=True,
                )
        finally:
            stop(sink)
    finally:
        plane.stop()
        if backends:
            backends.conn.close()
    return {
        "raw_per_s": _median(raw, "wall_s"),
        "raw_per_cpu_s": _median(raw, "cpu_s"),
        "ours_per_s": _median(ours, "wall_s"),
        "ours_per_cpu_s": _median(ours, "cpu_s"),
        "ratio_wall": _ratios(ours, raw, "wall_s"),
        "ratio_cpu": _ratios(ours, raw, "cpu_s"),
        "rounds": {"raw": raw, "ours": ours},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="synced per round")
    parser.add_argument("--raw-records", type=int, default=50_000, help="raw messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    policy = SyncPolicy()  # the agent's defaults
    parser.add_argument("--batch", type=int, default=policy.batch_records)
    parser.add_argument("--in-flight", type=int, default=policy.max_in_flight)
    parser.add_argument("--postgres", default="", help="admin DSN: measure PostgreSQL too")
    parser.add_argument("--only-postgres", action="store_true")
    parser.add_argument("--sink-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink_server:
        asyncio.run(_sink_server(*(Path(p) for p in args.sink_server)))
        return 0
    record_bytes = len(prediction(12345)) + 3  # + the sequence number when sent
    print(
        f"sync benchmark: {args.records:,} predictions of ~{record_bytes} B per round, raw "
        f"stream {args.raw_records:,} messages, {args.rounds} alternated rounds; batch "
        f"{args.batch}, {args.in_flight} in flight",
        flush=True,
    )
    stores: list[tuple[str, str]] = [] if args.only_postgres else [("sqlite", "")]
    dropped: list[str] = []
    if args.postgres:
        name, url = _postgres_database(args.postgres)
        dropped.append(name)
        stores.append(("postgresql", url))
    results: dict[str, dict[str, Any]] = {}
    try:
        for label, url in stores:
            print(f"-- {label}", flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"autoglm-bench-sync-{label}-"))
            results[label] = run(args, work, url)
    finally:
        for name in dropped:
            _drop_database(args.postgres, name)
    print()
    print("| store | raw stream/s | raw/CPU-s | ours/s | ours/CPU-s | x raw wall | x raw CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {r['raw_per_s']:,.0f} | {r['raw_per_cpu_s']:,.0f} | "
            f"{r['ours_per_s']:,.0f} | {r['ours_per_cpu_s']:,.0f} | {r['ratio_wall']:.2f}x | "
            f"{r['ratio_cpu']:.2f}x |"
        )
    print(
        json.dumps({k: {x: y for x, y in v.items() if x != "rounds"} for k, v in results.items()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
