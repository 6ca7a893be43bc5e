"""`autoglm cloud serve --workers N`: N control-plane processes on one host, sharing the API
and device ports (`SO_REUSEPORT`: the kernel spreads new connections over them).

One process serves all of its sessions on one event loop under one GIL; with 10,000 agent
sessions its garbage collections and its loop's waits for a CPU set the heartbeat tail
(tests/benchmarks/bench_heartbeats.py). Workers split the sessions. Each worker is a replica
like any other (one PostgreSQL, leader election, change notifications), and this supervisor
starts and watches them:

- worker 0 starts first, on the configured ports (port 0: the kernel's choice); the others
  then start together, on the ports it got;
- worker k serves its own health and metrics ports, the configured port + k (port 0 stays 0),
  so that each can be probed and scraped on its own; only worker 0 serves the web console;
- a worker that dies is started again, after 1 s, doubling to 30 s while it keeps dying
  young. One that fails while the pool starts stops the pool (a bad setting would fail
  every time);
- SIGTERM or SIGINT stops every worker gracefully (SIGKILL after `STOP_GRACE_S`); a
  supervisor killed outright takes its workers with it (Linux's parent-death signal).

SQLite takes one writer, so several workers need PostgreSQL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from edge_agent.errors import ConfigError, LocalStateError

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that ran this long starts its backoff over
POLL_S = 0.2


def check_workers(workers: int, database_url: str) -> None:
    if workers > 1 and database_url.startswith("sqlite"):
        raise ConfigError(
            f"workers = {workers} needs a PostgreSQL database_url: SQLite takes one writer "
            "(set database_url, or serve with one worker)"
        )


def shifted(listen: str, index: int) -> str:
    """`host:port` moved up by `index` ports; port 0 and an empty address stay as they are."""
    if not listen:
        return listen
    host, _, port = listen.rpartition(":")
    return listen if int(port) == 0 else f"{host}:{int(port) + index}"


def check_free(listen: str) -> None:
    """Fails when something already listens on `listen`'s port. Workers share their ports,
    so their own binding would not notice another control plane (or another program that
    shares ports) already there."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        raise LocalStateError(
            f"cannot listen on {listen}: {exc.strerror or exc} (is another control plane, or "
            "another program, using the port?)"
        ) from None


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ports_file: Path
    started: float
    ports: dict[str, int] = field(default_factory=dict)
    failures: int = 0  # deaths in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None


class WorkerFailed(Exception):
    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"worker {index} exited with status {code} while starting")
        self.index = index
        self.code = code


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self.command = command
        self.api_listen = api_listen
        self.device_listen = device_listen
        self.ports_file = ports_file
        self.clock = clock
        self.workers: list[Worker] = []
        self.stopping = threading.Event()
        self._dir = Path(tempfile.mkdtemp(prefix="autoglm-workers-"))

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            check_free(self.api_listen)
            check_free(self.device_listen)
            try:
                self._start_all()
            except WorkerFailed as exc:
                log.error("%s; stopping the other workers", exc)
                return exc.code or 1
            while not self.stopping.wait(POLL_S):
                self._watch()
            log.info("stopping %d workers", len(self.workers))
            return 0
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(OSError):
                for path in self._dir.iterdir():
                    path.unlink()
                self._dir.rmdir()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _start_all(self) -> None:
        first = self._spawn(0, self.api_listen, self.device_listen)
        self.workers.append(first)
        self._wait_ready(first)
        if self.stopping.is_set():
            return
        host = self.api_listen.rpartition(":")[0]
        self.api_listen = f"{host}:{first.ports['api_port']}"
        host = self.device_listen.rpartition(":")[0]
        self.device_listen = f"{host}:{first.ports['device_port']}"
        self.workers += [
            self._spawn(index, self.api_listen, self.device_listen)
            for index in range(1, self.count)
        ]
        for worker in self.workers[1:]:
            self._wait_ready(worker)
            if self.stopping.is_set():
                return
        self._write_ports()
        print(
            f"serving api={self.api_listen} device={self.device_listen} with "
            f"{self.count} workers (pids {' '.join(str(w.proc.pid) for w in self.workers)})",
            file=sys.stderr,
            flush=True,
        )

    def _spawn(self, index: int, api: str, device: str) -> Worker:
        ports_file = self._dir / f"worker-{index}.json"
        ports_file.unlink(missing_ok=True)
        proc = subprocess.Popen(
            self.command(index, api, device, ports_file),
            preexec_fn=_dies_with(os.getpid()),  # safe here: the supervisor has one thread
        )
        return Worker(index, proc, ports_file, self.clock())

    def _wait_ready(self, worker: Worker) -> None:
        """Until the worker wrote its ports; WorkerFailed if it exited first (a stop asked for
        meanwhile ends the wait too)."""
        while not worker.ports_file.exists():
            code = worker.proc.poll()
            if code is not None:
                raise WorkerFailed(worker.index, code)
            if self.stopping.wait(0.05):
                return
        worker.ports = json.loads(worker.ports_file.read_text())

    def _watch(self) -> None:
        now = self.clock()
        for i, worker in enumerate(self.workers):
            if worker.restart_at is None:
                code = worker.proc.poll()
                if code is None:
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
            elif now >= worker.restart_at:
                fresh = self._spawn(worker.index, self.api_listen, self.device_listen)
                fresh.failures = worker.failures
                self.workers[i] = fresh
                try:
                    self._wait_ready(fresh)
                except WorkerFailed:
                    continue  # seen dead on the next watch, with a longer backoff
                try:
                    self._write_ports()
                except LocalStateError as exc:
                    log.error("%s", exc)
                log.info("worker %d started again (pid %d)", fresh.index, fresh.proc.pid)

    def _write_ports(self) -> None:
        if self.ports_file is None:
            return
        first = self.workers[0].ports
        ports: dict[str, Any] = dict(first)
        ports["workers"] = [
            {
                "index": w.index,
                "pid": w.proc.pid,
                "health_port": w.ports.get("health_port", 0),
                "metrics_port": w.ports.get("metrics_port", 0),
            }
            for w in self.workers
        ]
        tmp = self.ports_file.with_name(self.ports_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(ports))
            tmp.replace(self.ports_file)
        except OSError as exc:
            raise LocalStateError(f"cannot write {self.ports_file}: {exc.strerror}") from None

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


def _dies_with(supervisor: int) -> Callable[[], None]:
    """Run in the forked worker before it starts: SIGTERM when the supervisor dies, also by
    kill -9 (Linux's PR_SET_PDEATHSIG; nothing elsewhere)."""

    def arm() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:  # it died before the signal was armed
            os._exit(1)

    return arm


PR_SET_PDEATHSIG = 1
