"""`autoglm cloud serve --workers N`: N control-plane processes on one host, sharing the API
and device ports (`SO_REUSEPORT`: the kernel spreads new connections over them).

One process serves all of its sessions on one event loop under one GIL; with 10,000 agent
sessions its garbage collections and its loop's waits for a CPU set the heartbeat tail
(tests/benchmarks/bench_heartbeats.py). Workers split the sessions. Each worker is a replica
like any other (one PostgreSQL, leader election, change notifications), and this supervisor
starts and watches them:

- on fixed ports every worker starts at once; on port 0 (the kernel's choice) worker 0 starts
  first and the others then on the ports it got; the ports file lists them once all serve,
  and a dead worker without a pid (0) until its successor serves;
- worker k serves its own health and metrics ports, the configured port + k (port 0 stays 0),
  so that each can be probed and scraped on its own; only worker 0 serves the web console;
- a worker that dies is started again, after 1 s, doubling to 30 s while it keeps dying
  young. One that fails while the pool starts stops the pool (a bad setting would fail
  every time);
- SIGTERM or SIGINT stops every worker gracefully (SIGKILL after `STOP_GRACE_S`); a worker
  whose supervisor is killed outright gets SIGTERM (Linux's parent-death signal).

Sessions stay where they connected: the kernel spreads new connections only, so a worker
started again comes back empty and fills as agents reconnect.
SQLite takes one writer, so several workers need PostgreSQL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_agent.errors import ConfigError, LocalStateError

if TYPE_CHECKING:
    from cloud.config import CloudConfig

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that ran this long starts its backoff over
POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def check_plan(config: CloudConfig) -> None:
    """Refuses what N workers cannot run with: SQLite, and probe or metrics ports that,
    moved up by the worker's index, land on another port of the plane."""
    n = config.workers
    if n == 1:
        return
    if config.resolved_database_url.startswith("sqlite"):
        raise ConfigError(
            f"workers = {n} needs a PostgreSQL database_url: SQLite takes one writer "
            "(set database_url, or serve with one worker)"
        )
    used: dict[int, str] = {}
    planned = [
        ("api_listen", config.api_listen, 1),
        ("device_listen", config.device_listen, 1),
        ("console_listen", config.console_listen, 1),
        ("health_listen", config.health_listen, n),
        ("metrics_listen", config.metrics_listen, n),
    ]
    for key, listen, count in planned:
        port = int(listen.rpartition(":")[2] or 0)
        for k in range(count if port else 0):
            if (other := used.get(port + k)) is not None:
                shown = f"{key} {listen}" + (f" + {k} (worker {k})" if k else "")
                raise ConfigError(
                    f"{shown} is port {port + k}, also {other}: with {n} workers, worker k "
                    "serves health_listen and metrics_listen on the configured port + k"
                )
            used[port + k] = f"{key}" + (f" of worker {k}" if k else "")


def shifted(listen: str, index: int) -> str:
    """`host:port` moved up by `index` ports; port 0 and an empty address stay as they are."""
    if not listen:
        return listen
    host, _, port = listen.rpartition(":")
    return listen if int(port) == 0 else f"{host}:{int(port) + index}"


def check_free(listen: str) -> None:
    """Fails when something already listens on `listen`'s port. Workers share their ports,
    so their own binding would not notice another control plane (or another program that
    shares ports) already there. Connections of an earlier run waiting out TIME_WAIT do not
    count (SO_REUSEADDR, as gRPC binds)."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise LocalStateError(
            f"cannot listen on {listen}: {exc.strerror or exc} (is another control plane, or "
            "another program, using the port?)"
        ) from None


def follow_supervisor(supervisor: int) -> None:
    """Called first in a worker: SIGTERM when the supervisor dies, also by kill -9 (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). Exits at once if it is gone already."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:
        raise SystemExit(f"the supervisor (pid {supervisor}) is gone; not starting")


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ports_file: Path
    started: float
    ports: dict[str, int] = field(default_factory=dict)
    failures: int = 0  # deaths in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None  # dead, to be started again then


class WorkerFailed(Exception):
    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} exited with status {code} while starting")
        self.index = index
        # A shell's convention for a death by signal (Popen gives -signum).
        self.code = 128 - code if code < 0 else code or 1


class WorkerPool:
    """Runs `count` workers from `command(index, api_listen, device_listen, ports_file)` (an
    argv) until SIGTERM or SIGINT."""

    def __init__(
        self,
        count: int,
        command: Callable[[int, str, str, Path], list[str]],
        api_listen: str,
        device_listen: str,
        ports_file: Path | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.count = count
        self.command = command
        self.api_listen = api_listen
        self.device_listen = device_listen
        self.ports_file = ports_file
        self.env = env
        self.workers: list[Worker] = []
        self._known: dict[int, dict[str, int]] = {}  # each index's ports, once it served
        self.stopping = False  # set by the signal handler only (no lock taken in there)
        self._dir = Path()

    def run(self) -> int:
        check_free(self.api_listen)
        check_free(self.device_listen)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        self._dir = Path(tempfile.mkdtemp(prefix=f"autoglm-workers-{os.getpid()}-"))
        try:
            try:
                self._start_all()
            except WorkerFailed as exc:
                if self.stopping:  # the same stop reached the worker first (a terminal's ^C)
                    return 0
                log.error("%s; stopping the other workers", exc)
                return exc.code
            while not self.stopping:
                time.sleep(POLL_S)
                self._watch()
            log.info("stopping %d workers", len(self.workers))
            return 0
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self._dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _start_all(self) -> None:
        fixed = _port(self.api_listen) and _port(self.device_listen)
        self.workers.append(self._spawn(0))
        if not fixed:  # the others bind the ports the kernel gave worker 0
            if not self._wait_ready(self.workers):
                return
            first = self.workers[0].ports
            self.api_listen = _with_port(self.api_listen, first["api_port"])
            self.device_listen = _with_port(self.device_listen, first["device_port"])
        self.workers += [self._spawn(index) for index in range(1, self.count)]
        if not self._wait_ready(self.workers):
            return
        self._write_ports()
        pids = " ".join(str(w.proc.pid) for w in self.workers)
        print(
            f"serving api={self.api_listen} device={self.device_listen} with {self.count} "
            f"workers (pids {pids})",
            file=sys.stderr,
            flush=True,
        )

    def _spawn(self, index: int) -> Worker:
        ports_file = self._dir / f"worker-{index}.json"
        ports_file.unlink(missing_ok=True)
        argv = self.command(index, self.api_listen, self.device_listen, ports_file)
        return Worker(index, subprocess.Popen(argv, env=self.env), ports_file, time.monotonic())

    def _wait_ready(self, workers: list[Worker]) -> bool:
        """Until every one of `workers` wrote its ports (True), or a stop was asked for
        (False); WorkerFailed as soon as one exits first."""
        while not all(self._ready(worker) for worker in workers):
            if self.stopping:
                return False
            for worker in workers:
                code = worker.proc.poll()
                if code is not None and not self._ready(worker):
                    raise WorkerFailed(worker.index, code)
            time.sleep(0.05)
        return True

    def _ready(self, worker: Worker) -> bool:
        if not worker.ports and worker.ports_file.exists():
            worker.ports = json.loads(worker.ports_file.read_text())
            self._known[worker.index] = worker.ports
        return bool(worker.ports)

    def _watch(self) -> None:
        """Restarts dead workers and notes restarted ones that are ready; never waits."""
        now = time.monotonic()
        for i, worker in enumerate(self.workers):
            if self.stopping:
                return
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    fresh = self._spawn(worker.index)
                    fresh.failures = worker.failures
                    self.workers[i] = fresh
                continue
            code = worker.proc.poll()
            if code is None:
                if not worker.ports and self._ready(worker):  # a restarted one, now serving
                    log.info("worker %d started again (pid %d)", worker.index, worker.proc.pid)
                    self._write_ports()
                continue
            young = now - worker.started < STABLE_AFTER_S
            failures = worker.failures + 1 if young else 1
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (failures - 1))
            log.error(
                "worker %d (pid %d) exited with status %s; starting it again in %.0f s",
                worker.index,
                worker.proc.pid,
                code,
                delay,
            )
            worker.failures, worker.restart_at = failures, now + delay
            self._write_ports()  # listed without a pid until one serves again

    def _write_ports(self) -> None:
        if self.ports_file is None:
            return
        first = self._known.get(0, {})
        ports: dict[str, Any] = {
            key: first.get(key, 0) for key in ("health_port", "metrics_port", "console_port")
        }
        ports["api_port"] = _port(self.api_listen)
        ports["device_port"] = _port(self.device_listen)
        ports["workers"] = [
            {
                "index": w.index,
                "pid": w.proc.pid if w.ports and w.restart_at is None else 0,
                "health_port": self._known.get(w.index, {}).get("health_port", 0),
                "metrics_port": self._known.get(w.index, {}).get("metrics_port", 0),
            }
            for w in self.workers
        ]
        tmp = self.ports_file.with_name(self.ports_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(ports))
            tmp.replace(self.ports_file)
        except OSError as exc:
            log.error("cannot write %s: %s", self.ports_file, exc.strerror)

    def _stop_all(self) -> None:
        alive = [w.proc for w in self.workers if w.proc.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in %.0f s; killed", proc.pid, STOP_GRACE_S)
                proc.kill()
                proc.wait()


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def _with_port(listen: str, port: int) -> str:
    return f"{listen.rpartition(':')[0]}:{port}"
