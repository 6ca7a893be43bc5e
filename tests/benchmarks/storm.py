"""The restart storm's agents: one `AgentGroup` of real `CloudSession`s on one event loop,
driven in the benchmark's own process (`LocalGroup`) or in a worker process over a pipe
(`WorkerGroup`, one JSON line per command and per reply). One process's file descriptors
(limit 20,000 here, gRPC uses more than two per channel) do not hold 10,000 agents."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cloud.config import CloudConfig  # noqa: E402
from edge_agent.config import CloudLink, ReconnectPolicy  # noqa: E402
from edge_agent.identity import DeviceIdentity, load_identity  # noqa: E402
from edge_agent.retry import Backoff  # noqa: E402
from edge_agent.session import (  # noqa: E402
    DEAD_AFTER_S,
    SETUP_TIMEOUT_S,
    CloudSession,
    SessionStats,
)
from protos.autoglm.v1 import agent_pb2, common_pb2  # noqa: E402
from tests.benchmarks.fleet import percentile, run_queue, run_queue_share  # noqa: E402

STATUS = agent_pb2.AgentStatus(model_version="1", inference_backend="onnxruntime-cpu")
HOST = common_pb2.HostFacts(hostname="bench", arch="x86_64", cpu_count=2)

# The storm's two policies: this release's reconnect policy, session setup timeout and
# session admission, and the ones before them (+-20 % jitter, 60 s ceiling, a session
# setup given the dead-path bound of 15 s, every setup admitted).
NEW_SETUPS: int = CloudConfig.model_fields["max_session_setups"].default
NEW_SETUP_TIMEOUT_S: float = CloudLink.model_fields["setup_timeout_s"].default
POLICIES: dict[str, tuple[Callable[[], Backoff], int, float]] = {
    "new": (lambda: ReconnectPolicy().backoff(), NEW_SETUPS, NEW_SETUP_TIMEOUT_S),
    "old": (lambda: Backoff(1.0, 60.0, 2.0, 0.2), 1_000_000, DEAD_AFTER_S),
}

Report = dict[str, Any]


def _policy(name: str) -> tuple[Callable[[], Backoff], float]:
    """The agents' side of a policy: their backoff and session setup timeout."""
    backoff, _, setup_timeout_s = POLICIES[name]
    return backoff, setup_timeout_s


def error_kind(error: str, address: str) -> str:
    """A session error by kind: its message up to the details, without the address."""
    return error.replace(address, "<plane>").split(" (")[0][:70]


# How long a failed session setup took, from opening its channel (before the TLS handshake) to
# its error: upper bounds in seconds. gRPC core drops a call that waited too long for the
# server's Python side to take it (`grpc.server_max_unrequested_time_in_server`: gRPC's 30 s,
# the plane's 55 s; at the server's next take, so the drop comes at that time or later); the
# agents' own setup timeout is 60 s.
AGE_BOUNDS_S = (1.0, 5.0, 15.0, 28.0, 35.0, 58.0, 65.0)
AGE_LABELS = [f"<={b:g}s" for b in AGE_BOUNDS_S] + [f">{AGE_BOUNDS_S[-1]:g}s"]


def age_label(age_s: float) -> str:
    """The `AGE_LABELS` bucket a failed setup of `age_s` seconds falls in."""
    return next((f"<={b:g}s" for b in AGE_BOUNDS_S if age_s <= b), AGE_LABELS[-1])


class CountedStats(SessionStats):
    """A session's counters that also count every failed attempt's error by kind (the
    session keeps only the last one), and by how long the attempt took (`TimedSession`)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.error_kinds: dict[str, int] = {}
        self.error_ages: dict[str, dict[str, int]] = {}
        self.error_samples: dict[str, str] = {}  # a kind's first whole message
        self.attempt_started = time.monotonic()
        self.opened_before_attempt = 0
        super().__init__()

    @property
    def last_error(self) -> str:
        return self._last_error

    @last_error.setter
    def last_error(self, error: str) -> None:
        self._last_error = error
        kind = error_kind(error, self.address) if error else "(no message)"
        if error or self.attempts_failed:  # the dataclass's first "" is not a failure
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
            self.error_samples.setdefault(kind, error.replace(self.address, "<plane>"))
            if self.sessions_opened == self.opened_before_attempt:  # a setup that failed
                label = age_label(time.monotonic() - self.attempt_started)
                ages = self.error_ages.setdefault(kind, {})
                ages[label] = ages.get(label, 0) + 1


class TimedSession(CloudSession):
    """The agent's session, noting when each attempt starts (for `CountedStats`)."""

    async def _session(self, stop: asyncio.Event) -> None:
        if isinstance(self.stats, CountedStats):
            self.stats.attempt_started = time.monotonic()
            self.stats.opened_before_attempt = self.stats.sessions_opened
        await super()._session(stop)


def make_sessions(
    identities: list[DeviceIdentity],
    interval: float,
    backoff: Callable[[], Backoff],
    setup_timeout_s: float = SETUP_TIMEOUT_S,
) -> list[CloudSession]:
    """The agents' sessions, dialling 127.0.0.1: `localhost` tries ::1 as well, and the
    second socket per agent ran 10,000 agents out of file descriptors (limit 20,000)."""
    sessions: list[CloudSession] = [
        TimedSession(
            ident,
            status=lambda: STATUS,
            host=lambda: HOST,
            backoff=backoff(),
            heartbeat_interval_s=interval,
            device_address="127.0.0.1:" + ident.info.device_address.rsplit(":", 1)[1],
            tls_server_name="localhost",
            setup_timeout_s=setup_timeout_s,
        )
        for ident in identities
    ]
    for session in sessions:
        session.stats = CountedStats(session.address)
    return sessions


def _counted(sessions: list[CloudSession]) -> list[CountedStats]:
    return [s.stats for s in sessions if isinstance(s.stats, CountedStats)]


def attempt_errors(sessions: list[CloudSession]) -> dict[str, int]:
    """Every failed attempt so far by the kind of its error, all sessions together."""
    return merged([c.error_kinds for c in _counted(sessions)])


def attempt_error_ages(sessions: list[CloudSession]) -> dict[str, dict[str, int]]:
    """Every failed session setup so far by the kind of its error and how long it took."""
    return merged_ages([c.error_ages for c in _counted(sessions)])


def attempt_error_samples(sessions: list[CloudSession]) -> dict[str, str]:
    """One whole message of each kind of failed attempt (a kind is cut at its details)."""
    return merged_samples([c.error_samples for c in _counted(sessions)])


async def wait_connected(sessions: list[CloudSession], timeout_s: float) -> float:
    start = time.monotonic()
    while sum(s.connected for s in sessions) < len(sessions):
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def _sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))


async def loop_lags(end: float, tick: float = 0.01) -> list[float]:
    """How late this event loop wakes a `tick` sleep, until `end`: the delay every
    callback on the loop (an ack being read, a heartbeat being written) waits as well."""
    lags: list[float] = []
    while (now := time.monotonic()) < end:
        await asyncio.sleep(tick)
        lags.append(time.monotonic() - now - tick)
    return lags


class AgentGroup:
    """Sessions on this event loop, through the storm's phases. Times are absolute
    `time.monotonic()` (one clock for every process on the machine)."""

    def __init__(self, sessions: list[CloudSession]) -> None:
        self.sessions = sessions
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._back: asyncio.Task[Report] | None = None

    async def connect(self, timeout_s: float, ramp_s: float = 0.0) -> Report:
        """Starts the sessions, spread evenly over `ramp_s` (0: all at once), and waits up
        to `timeout_s` after the last start for all of them to be connected; `connect_s`
        counts from the first start."""
        start, step = time.monotonic(), ramp_s / len(self.sessions)
        for i, s in enumerate(self.sessions):
            if ramp_s:  # on a schedule: a busy loop's late wake-ups do not add up
                await _sleep_until(start + i * step)
            self._tasks.append(asyncio.create_task(s.run(self._stop)))
        await wait_connected(self.sessions, timeout_s)
        connect_s = time.monotonic() - start  # the ramp included
        connected = sum(s.connected for s in self.sessions)
        return {
            "connect_s": connect_s,
            "connected": connected,
            "failed_attempts": sum(s.stats.attempts_failed for s in self.sessions),
            "attempt_errors": attempt_errors(self.sessions),
            "attempt_error_ages": attempt_error_ages(self.sessions),
            "attempt_error_samples": attempt_error_samples(self.sessions),
            "last_errors": self.last_errors() if connected < len(self.sessions) else {},
        }

    def mark(self, deadline: float) -> None:
        """Counts from now (the plane is killed next): `back` reports when each session
        opened a new one, watched until all have or `deadline`."""
        opened = [s.stats.sessions_opened for s in self.sessions]
        failed = sum(s.stats.attempts_failed for s in self.sessions)
        busy = sum(s.stats.busy_refusals for s in self.sessions)
        self._back = asyncio.create_task(self._watch(opened, failed, busy, deadline))

    async def _watch(self, opened: list[int], failed: int, busy: int, deadline: float) -> Report:
        cpu = time.process_time()
        back_at: list[float] = []
        waiting = set(range(len(self.sessions)))
        while waiting and time.monotonic() < deadline:
            now = time.monotonic()
            for i in [i for i in waiting if self.sessions[i].stats.sessions_opened > opened[i]]:
                back_at.append(now)
                waiting.discard(i)
            await asyncio.sleep(0.05)
        return {
            "last_errors": self.last_errors(),
            "attempt_error_ages": attempt_error_ages(self.sessions),
            "attempt_error_samples": attempt_error_samples(self.sessions),
            "back_at": back_at,
            "waiting": len(waiting),
            "failed_attempts": sum(s.stats.attempts_failed for s in self.sessions) - failed,
            "busy_refusals": sum(s.stats.busy_refusals for s in self.sessions) - busy,
            "cpu_s": time.process_time() - cpu,
        }

    def last_errors(self) -> dict[str, int]:
        """The sessions' last errors by kind: the message up to its details, no address."""
        errors: dict[str, int] = {}
        for s in self.sessions:
            if s.stats.last_error:
                kind = error_kind(s.stats.last_error, s.address)
                errors[kind] = errors.get(kind, 0) + 1
        return errors

    async def back(self) -> Report:
        assert self._back is not None, "mark first"
        return await self._back

    async def measure(self, start: float, end: float) -> Report:
        """Heartbeat acks between `start` and `end`."""
        await _sleep_until(start)
        for s in self.sessions:
            s.stats.ack_latencies_s.clear()
        sent = sum(s.stats.heartbeats_sent for s in self.sessions)
        acked = sum(s.stats.heartbeats_acked for s in self.sessions)
        opened = sum(s.stats.sessions_opened for s in self.sessions)
        cpu = time.process_time()
        queue = run_queue(os.getpid())
        lags = await loop_lags(end)
        return {
            "main_thread": run_queue_share(queue, run_queue(os.getpid()), end - start),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "threads": len(os.listdir("/proc/self/task")),
            "latencies": [x for s in self.sessions for x in s.stats.ack_latencies_s],
            "sent": sum(s.stats.heartbeats_sent for s in self.sessions) - sent,
            "acked": sum(s.stats.heartbeats_acked for s in self.sessions) - acked,
            "connected": sum(s.connected for s in self.sessions),
            "reconnects_in_window": sum(s.stats.sessions_opened for s in self.sessions) - opened,
            "cpu_s": time.process_time() - cpu,
            "loop_lag_ms": [percentile(lags, q) * 1000 for q in (0.5, 0.99)],
        }

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


class GroupHandle(Protocol):
    """An `AgentGroup` wherever it runs."""

    async def connect(self, timeout_s: float, ramp_s: float = 0.0) -> Report: ...
    async def mark(self, deadline: float) -> None: ...
    async def back(self) -> Report: ...
    async def measure(self, start: float, end: float) -> Report: ...
    async def stop(self) -> None: ...


class LocalGroup:
    """The group on the benchmark's own event loop (the single-process storm)."""

    def __init__(self, identities: list[DeviceIdentity], interval: float, policy: str) -> None:
        self.group = AgentGroup(make_sessions(identities, interval, *_policy(policy)))

    async def connect(self, timeout_s: float, ramp_s: float = 0.0) -> Report:
        return await self.group.connect(timeout_s, ramp_s)

    async def mark(self, deadline: float) -> None:
        self.group.mark(deadline)

    async def back(self) -> Report:
        return await self.group.back()

    async def measure(self, start: float, end: float) -> Report:
        return await self.group.measure(start, end)

    async def stop(self) -> None:
        await self.group.stop()


class WorkerGroup:
    """The group in a worker process (`--storm-worker`), a command per JSON line on its
    stdin, a reply per line on its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls,
        work: Path,
        first: int,
        count: int,
        interval: float,
        policy: str,
        log: Path,
        nice: int = 0,
    ) -> WorkerGroup:
        """`nice`: the worker's nice value (`nice -n`); positive runs it behind the plane."""
        niced = ["nice", "-n", str(nice)] if nice else []
        with log.open("w") as err:
            proc = await asyncio.create_subprocess_exec(
                *niced,
                *[sys.executable, str(Path(__file__).with_name("bench_heartbeats.py"))],
                *["--storm-worker", str(work), str(first), str(count), str(interval), policy],
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=1 << 28,  # a reply is one line: thousands of latencies
            )
        return cls(proc)

    async def _call(self, command: str, **args: float) -> Report:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"command": command, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"storm worker {self.proc.pid} exited ({await self.proc.wait()})")
        reply: Report = json.loads(line)
        return reply

    async def connect(self, timeout_s: float, ramp_s: float = 0.0) -> Report:
        return await self._call("connect", timeout_s=timeout_s, ramp_s=ramp_s)

    async def mark(self, deadline: float) -> None:
        await self._call("mark", deadline=deadline)

    async def back(self) -> Report:
        return await self._call("back")

    async def measure(self, start: float, end: float) -> Report:
        return await self._call("measure", start=start, end=end)

    async def stop(self) -> None:
        await self._call("stop")
        await self.proc.wait()


async def serve_worker(work: Path, first: int, count: int, interval: float, policy: str) -> None:
    """The worker's side: agents bench-<first>.. enrolled under `work`, one command at a
    time from stdin until `stop`."""
    identities = [load_identity(work / "agents" / f"{i:05d}") for i in range(first, first + count)]
    group = AgentGroup(make_sessions(identities, interval, *_policy(policy)))
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            await group.stop()
            return
        msg = json.loads(line)
        reply: Report = {}
        if msg["command"] == "connect":
            reply = await group.connect(msg["timeout_s"], msg.get("ramp_s", 0.0))
        elif msg["command"] == "mark":
            group.mark(msg["deadline"])
        elif msg["command"] == "back":
            reply = await group.back()
        elif msg["command"] == "measure":
            reply = await group.measure(msg["start"], msg["end"])
        elif msg["command"] == "stop":
            await group.stop()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if msg["command"] == "stop":
            return


def merged(counts: list[dict[str, int]]) -> dict[str, int]:
    """Counts by kind summed over the dicts given (sessions, processes), the largest first."""
    total: dict[str, int] = {}
    for c in counts:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + n
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def merged_ages(ages: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Failed setups by error kind and how long they took (shortest first), summed over the
    agent processes."""
    total: dict[str, dict[str, int]] = {}
    for kind in sorted({kind for a in ages for kind in a}):
        counts = merged([a.get(kind, {}) for a in ages])
        total[kind] = {label: counts[label] for label in AGE_LABELS if label in counts}
    return total


def merged_samples(samples: list[dict[str, str]]) -> dict[str, str]:
    """A whole message for each kind of failed attempt, from whichever process had one."""
    return {kind: text for s in reversed(samples) for kind, text in s.items()}
