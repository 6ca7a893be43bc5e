"""Shared by the benchmarks: a control plane in its own process, enrolled device identities,
CPU accounting and percentiles."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cloud.client import Connection, OperatorClient  # noqa: E402
from cloud.config import CONFIG_FILE  # noqa: E402
from cloud.service.serde import bootstrap_from_registration  # noqa: E402
from cloud.state_dir import init_state_dir  # noqa: E402
from edge_agent.enroll import enroll  # noqa: E402
from edge_agent.identity import DeviceIdentity, load_identity  # noqa: E402
from protos.autoglm.v1 import operator_pb2  # noqa: E402
from tests.support.processes import running  # noqa: E402


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue(pid: int, tid: int | None = None) -> tuple[float, float, int]:
    """One thread's (the process's main thread by default) seconds on a CPU, seconds
    runnable but waiting for one, and times it was scheduled (Linux /proc schedstat). The
    wait is what a busy machine adds to every event that thread handles."""
    fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9, int(fields[2])


def run_queue_share(
    before: tuple[float, float, int], after: tuple[float, float, int], seconds: float
) -> dict[str, float]:
    """Between two `run_queue` readings: the share of the window the thread ran and the share
    it waited runnable, and its mean wait per time it was scheduled."""
    slices = max(1, after[2] - before[2])
    return {
        "ran_share": (after[0] - before[0]) / seconds,
        "waited_share": (after[1] - before[1]) / seconds,
        "wait_per_slice_ms": (after[1] - before[1]) / slices * 1000,
    }


PROFILE_RATE_HZ = 100  # py-spy's default sampling rate


def py_spy() -> str | None:
    """The py-spy executable (on PATH or beside this Python), if installed."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def start_profile(spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` for `seconds` into `out`: raw collapsed stacks of the threads
    holding the GIL (what one Python process's work queues behind), without pausing it;
    its own messages go to `out` with `.log` added."""
    out.unlink(missing_ok=True)
    args = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    args += ["--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--output", str(out)]
    args += ["--nonblocking", "--threads", "--gil", "--nolineno"]
    with out.with_name(out.name + ".log").open("wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def profile_summary(path: Path, seconds: float, top: int = 10) -> dict[str, Any]:
    """A raw py-spy profile over `seconds`: the share of the time some thread held the GIL
    (`gil_busy`), then shares of the samples by thread, by innermost function ("self";
    grpc's Cython callbacks show as asyncio's `Handle._run`) and by this project's functions
    anywhere on the stack ("ours"), the largest `top` each."""
    threads: dict[str, int] = {}
    leaf: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        total += n
        threads[thread] = threads.get(thread, 0) + n
        if frames:
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for name in {f for f in frames if "(cloud/" in f or "(edge_agent/" in f}:
            ours[name] = ours.get(name, 0) + n

    def largest(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, n / max(1, total)) for name, n in ranked]

    return {
        "gil_busy": total / (PROFILE_RATE_HZ * seconds),
        "threads": largest(threads),
        "self": largest(leaf),
        "ours": largest(ours),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spawn(args: list[str], ports_file: Path, log: Path) -> subprocess.Popen[bytes]:
    """Starts a process that writes `ports_file` once it listens; waits for that."""
    # This checkout's code, not whatever the environment's editable install points at (a
    # shared virtualenv's `autoglm` imports the checkout it was installed from).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    }
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120  # a plane's workers start on a busy machine too
    while not ports_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args[0]} did not start; see {log}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class PlaneProcess:
    """`autoglm cloud serve` on a fresh state dir under `work`."""

    work: Path
    proc: subprocess.Popen[bytes]
    token: str
    api_port: int
    device_port: int

    @property
    def state(self) -> Path:
        return self.work / "cloud"

    @property
    def ca_pem(self) -> bytes:
        return (self.state / "ca.crt").read_bytes()

    def connection(self) -> Connection:
        return Connection(f"localhost:{self.api_port}", self.ca_pem, self.token, timeout_s=60)

    def client(self) -> OperatorClient:
        return OperatorClient(self.connection())

    def stop(self) -> None:
        stop(self.proc)

    def _ports(self) -> dict[str, Any]:
        return dict(json.loads((self.work / "ports.json").read_text()))

    def pids(self) -> list[int]:
        """The processes that serve: the workers of `cloud serve --workers N`, else the one."""
        workers = self._ports().get("workers", [])
        return [int(w["pid"]) for w in workers if w["pid"]] or [self.proc.pid]

    def histograms(self) -> dict[str, list[tuple[float, float]]]:
        """The plane's loop-lag and session-setup histograms now, by series name and labels:
        cumulative (upper bound, count) buckets, summed over its workers. Asks for those
        series only, so the plane does not read the fleet from its store for the scrape.
        Empty when the plane serves no metrics or does not answer within a minute (said on
        stderr)."""
        ports = self._ports()
        workers = [int(w["metrics_port"]) for w in ports.get("workers", [])]
        summed: dict[str, dict[float, float]] = {}
        for port in workers or [int(ports.get("metrics_port") or 0)]:
            if not port:
                return {}
            for key, buckets in _histograms(port).items():
                for le, n in buckets:
                    summed.setdefault(key, {})[le] = summed.get(key, {}).get(le, 0.0) + n
        return {key: sorted(buckets.items()) for key, buckets in summed.items()}

    def crash_and_restart(self, config: dict[str, object] | None = None) -> tuple[float, float]:
        """SIGKILL (to every worker too), then `autoglm cloud serve` again on the same state
        dir and ports (the agents' bootstraps name them). Returns (seconds to exit, seconds
        until it listens again); `proc` is the new process afterwards. `config`: settings to
        change."""
        t0 = time.monotonic()
        workers = [pid for pid in self.pids() if pid != self.proc.pid]
        for pid in workers:  # first: a supervisor's death would stop them gracefully
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        while any(map(running, workers)):
            time.sleep(0.01)
        died = time.monotonic() - t0
        path = self.state / CONFIG_FILE
        config = {**yaml.safe_load(path.read_text()), **(config or {})}
        config["api_listen"] = f"127.0.0.1:{self.api_port}"
        config["device_listen"] = f"127.0.0.1:{self.device_port}"
        path.write_text(yaml.safe_dump(config))
        (self.work / "ports.json").unlink()
        self.proc = _serve(self.work, "serve-restarted.log")
        return died, time.monotonic() - t0


def _histograms(port: int) -> dict[str, list[tuple[float, float]]]:
    """The loop-lag and session-setup histograms of the metrics served on `port`."""
    from prometheus_client.parser import text_string_to_metric_families

    names = ("autoglm_event_loop_lag_seconds", "autoglm_session_setup_seconds")
    query = "&".join(f"name[]={n}_bucket" for n in names)
    try:
        url = f"http://127.0.0.1:{port}/metrics?{query}"
        with urllib.request.urlopen(url, timeout=60) as r:
            text = r.read().decode()
    except OSError as exc:
        print(f"the plane's metrics could not be read: {exc}", file=sys.stderr)
        return {}
    found: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
                key = f"{family.name}{{{labels}}}"
                found.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
    return found


def histogram_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]], qs: tuple[float, ...]
) -> dict[str, float]:
    """Count and quantiles (the upper bound of the bucket that holds each) of what a
    histogram observed between two scrapes; nan where it observed nothing."""
    counts = dict(after)
    for le, n in before:
        counts[le] -= n
    bounds = sorted(counts)
    total = counts[bounds[-1]] if bounds else 0
    out: dict[str, float] = {"count": total}
    for q in qs:
        out[f"p{q * 100:g}"] = next(
            (le for le in bounds if total and counts[le] >= q * total), float("nan")
        )
    return out


def start_plane_process(
    work: Path, config: dict[str, object] | None = None, database_url: str = ""
) -> PlaneProcess:
    init = init_state_dir(
        work / "cloud",
        ["localhost"],
        api_listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        database_url=database_url,
    )
    # Its metrics on a port of their own: the benchmarks read its histograms.
    config = {"metrics_listen": "127.0.0.1:0", **(config or {})}
    if config:  # settings the benchmark needs (e.g. a faster rollout loop)
        path = work / "cloud" / CONFIG_FILE
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    proc = _serve(work, "serve.log")
    ports = json.loads((work / "ports.json").read_text())
    return PlaneProcess(work, proc, init.operator_token, ports["api_port"], ports["device_port"])


def _serve(work: Path, log_name: str) -> subprocess.Popen[bytes]:
    ports_file = work / "ports.json"
    command = [str(Path(sys.executable).parent / "autoglm"), "cloud", "serve", "--log-level"]
    return spawn(
        [*command, "WARNING", "--state-dir", str(work / "cloud"), "--ports-file", str(ports_file)],
        ports_file,
        work / log_name,
    )


def enroll_fleet(
    plane: PlaneProcess, first: int, count: int, labels: dict[str, str] | None = None
) -> list[DeviceIdentity]:
    """Registers and enrolls devices bench-<first>.. with the agent's real enrollment."""

    def one(i: int) -> DeviceIdentity:
        with plane.client() as client:
            reg = client.register_device(
                operator_pb2.RegisterDeviceRequest(name=f"bench-{i:05d}", labels=labels or {})
            )
        state = plane.work / "agents" / f"{i:05d}"
        enroll(bootstrap_from_registration(reg), state)
        return load_identity(state)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(first, first + count)))


async def serve_raw_until_sigterm(
    state: Path, ports_file: Path, handler: Any, client_auth: bool = True
) -> None:
    """A bare gRPC server (the raw baselines) with the control plane's certificate, mutual
    TLS unless `client_auth` is off; its port goes to `ports_file`; it serves `handler` until
    SIGTERM."""
    import asyncio

    import grpc
    from grpc import aio

    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [((state / "server.key").read_bytes(), (state / "server.crt").read_bytes())],
        root_certificates=(state / "ca.crt").read_bytes() if client_auth else None,
        require_client_auth=client_auth,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    ports_file.write_text(json.dumps({"port": port}))
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await server.stop(0)
