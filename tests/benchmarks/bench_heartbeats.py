"""Heartbeats one control-plane process sustains with M concurrent agent sessions (real
mutual TLS, the agent's real CloudSession), next to a raw unary gRPC ping over TLS measured
in the same run against a bare server process.

    python tests/benchmarks/bench_heartbeats.py [--scenarios 1000@0.2,1000@10,5000@10]

The control plane runs as its own process (`autoglm cloud serve`); all agents run in this
process on one event loop, or spread over worker processes with `--agent-processes N`, each
its own event loop. A scenario M@I runs M agents that each send a heartbeat every I seconds
(open loop: offered load = M / I); the window is at least two intervals. Beside them,
`--probe-agents` sessions in a process of their own measure what one agent that has its
own loop sees; each process also reports how late its loop runs a 10 ms timer. Prints one
line per scenario and a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cloud.service.metrics import SETUP_PHASES  # noqa: E402
from edge_agent.identity import DeviceIdentity  # noqa: E402
from tests.benchmarks.fleet import (  # noqa: E402
    PlaneProcess,
    enroll_fleet,
    histogram_quantiles,
    percentile,
    process_cpu_s,
    profile_summary,
    py_spy,
    run_queue,
    run_queue_share,
    spawn,
    start_plane_process,
    start_profile,
    stop,
)
from tests.benchmarks.heartbeat_report import scenario_lines, storm_line  # noqa: E402
from tests.benchmarks.ping_baseline import ping_baseline, serve_ping  # noqa: E402
from tests.benchmarks.storm import (  # noqa: E402
    POLICIES,
    GroupHandle,
    LocalGroup,
    WorkerGroup,
    merged,
    merged_ages,
    merged_samples,
    serve_worker,
)

# ---- the system under test ----
# Probe agents: a few sessions in a process of their own, a heartbeat a second each, measured
# beside the fleet. The fleet's thousands of sessions share one event loop per process, so
# their latencies include that loop's own backlog; a probe's loop is idle, so its latency is
# what one agent on its own device (one session per process) sees of the control plane.
PROBE_FIRST = 100_000  # the probes' identities: work/agents/100000..
RAMP_PER_S = 200.0  # sessions started a second in the steady-state scenarios (default)


@dataclass
class Probes:
    work: Path
    count: int
    interval: float

    async def start(self) -> GroupHandle | None:
        if not self.count:
            return None
        log = self.work / "probe-worker.log"
        group = await WorkerGroup.start(
            self.work, PROBE_FIRST, self.count, self.interval, "new", log
        )
        await group.connect(120)
        return group


async def run_sessions(
    identities: list[DeviceIdentity],
    interval: float,
    seconds: float,
    plane: PlaneProcess,
    processes: int,
    probes: Probes,
    ramp_per_s: float = RAMP_PER_S,
    profile: str = "",
    fleet_nice: int = 0,
) -> dict[str, Any]:
    """M agents with the agent's default reconnect policy, connected, then measured."""
    groups = await _start_groups(identities, interval, "new", plane.work, processes, fleet_nice)
    probe = await probes.start()
    setups_before = await asyncio.to_thread(plane.histograms)  # this scenario's setups only
    try:
        # Started at `ramp_per_s` sessions a second in all (a fleet coming up, not a storm:
        # the restart storm is measured on its own), each group its share.
        ramp = len(identities) / ramp_per_s
        connected = await asyncio.gather(*(g.connect(120, ramp) for g in groups))
        res = await _measure_groups(
            groups, len(identities), interval, seconds, plane, probe, setups_before, profile
        )
    finally:
        await asyncio.gather(*(g.stop() for g in [*groups, probe] if g is not None))
    return {
        "agents": len(identities),
        "agent_processes": len(groups),
        "connected": sum(c["connected"] for c in connected),
        "connect_s": max(c["connect_s"] for c in connected),
        "connect_failed_attempts": sum(c["failed_attempts"] for c in connected),
        "connect_last_errors": [c["last_errors"] for c in connected],
        "connect_attempt_errors": merged([c["attempt_errors"] for c in connected]),
        "connect_attempt_error_ages": merged_ages([c["attempt_error_ages"] for c in connected]),
        "connect_attempt_error_samples": merged_samples(
            [c["attempt_error_samples"] for c in connected]
        ),
        **res,
    }


async def run_storm(
    identities: list[DeviceIdentity],
    interval: float,
    seconds: float,
    plane: PlaneProcess,
    converge_timeout_s: float,
    policy: str,
    processes: int,
    probes: Probes,
    fleet_nice: int = 0,
) -> dict[str, object]:
    """M agents with the agent's default reconnect policy connected; the control plane is
    killed (SIGKILL) and started again on the same ports; how long until every agent has a
    new session, what that cost, and the heartbeat acks once they all have. `processes`:
    0 runs the agents on this event loop, N > 0 splits them over N worker processes."""
    # This round's admission bound, from the start (the plane restarts with it too).
    setups = POLICIES[policy][1]
    await asyncio.to_thread(plane.crash_and_restart, {"max_session_setups": setups})
    groups = await _start_groups(identities, interval, policy, plane.work, processes, fleet_nice)
    probe = await probes.start()  # they go through the storm too, and are measured after it
    try:
        return await _storm(groups, interval, seconds, plane, converge_timeout_s, policy, probe)
    finally:
        await asyncio.gather(*(g.stop() for g in [*groups, probe] if g is not None))


async def _start_groups(
    identities: list[DeviceIdentity],
    interval: float,
    policy: str,
    work: Path,
    processes: int,
    nice: int = 0,
) -> list[GroupHandle]:
    if not processes:
        return [LocalGroup(identities, interval, policy)]
    # The identities are the first M enrolled (work/agents/<i>, i from 0): each worker
    # loads its own slice from disk.
    cuts = [len(identities) * k // processes for k in range(processes + 1)]
    return list(
        await asyncio.gather(
            *(
                WorkerGroup.start(
                    work, a, b - a, interval, policy, work / f"storm-worker-{k}.log", nice
                )
                for k, (a, b) in enumerate(itertools.pairwise(cuts))
            )
        )
    )


async def _storm(
    groups: list[GroupHandle],
    interval: float,
    seconds: float,
    plane: PlaneProcess,
    converge_timeout_s: float,
    policy: str,
    probe: GroupHandle | None,
) -> dict[str, object]:
    connected = await asyncio.gather(*(g.connect(converge_timeout_s) for g in groups))
    await asyncio.sleep(min(interval, 5))  # steady state before the crash
    deadline = time.monotonic() + converge_timeout_s
    watched = [*groups, *([probe] if probe else [])]  # the probes are measured once back
    await asyncio.gather(*(g.mark(deadline) for g in watched))
    t_kill = time.monotonic()
    died_s, listening_s = await asyncio.to_thread(plane.crash_and_restart, {})
    backs = await asyncio.gather(*(g.back() for g in watched))
    if probe:
        backs.pop()
    converge_s = max(max(b["back_at"], default=t_kill) for b in backs) - t_kill
    # The new processes: all of it went to the storm.
    server_cpu = sum(map(process_cpu_s, plane.pids()))
    server_rss = sum(map(peak_rss_mib, plane.pids()))
    done = sorted(t - t_kill for b in backs for t in b["back_at"])
    waiting = sum(b["waiting"] for b in backs)
    errors: dict[str, int] = {}
    for b in backs:
        for kind, n in b["last_errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    agents = len(done) + waiting
    res = {} if waiting else await _measure_groups(groups, agents, interval, seconds, plane, probe)
    return {
        "policy": policy,
        "agents": agents,
        "agent_processes": len(groups),
        "first_connect_s": max(c["connect_s"] for c in connected),
        # Not all of them when the first connect ran out of `converge_timeout_s`.
        "connected_before_kill": sum(c["connected"] for c in connected),
        "exit_s": died_s,
        "listening_after_s": listening_s,
        "reconnected": len(done),
        "all_back_after_s": converge_s if not waiting else float("nan"),
        "back_p50_s": percentile(done, 0.5),
        "back_p99_s": percentile(done, 0.99),
        "failed_attempts": sum(b["failed_attempts"] for b in backs),
        "busy_refusals": sum(b["busy_refusals"] for b in backs),
        "storm_server_cpu_s": server_cpu,
        # One figure per agent process (this one's, when the agents run here).
        "storm_agents_cpu_s": [b["cpu_s"] for b in backs],
        "server_peak_rss_mib": server_rss,
        **res,
        "last_errors": errors,
        # Failed setups since the agents started (the first connect's too), by duration.
        "attempt_error_ages": merged_ages([b["attempt_error_ages"] for b in backs]),
        "attempt_error_samples": merged_samples([b["attempt_error_samples"] for b in backs]),
        "back_per_second": _histogram(done),
    }


async def _measure_groups(
    groups: list[GroupHandle],
    agents: int,
    interval: float,
    seconds: float,
    plane: PlaneProcess,
    probe: GroupHandle | None,
    setups_before: dict[str, list[tuple[float, float]]] | None = None,
    profile: str = "",
) -> dict[str, Any]:
    """Heartbeat acks over `seconds` after a warm-up in which every session has sent one;
    every group, the probes and the plane (CPU, its event loop's lag) over the same window,
    and the plane's session setups since `setups_before` (None: since it started); with
    `profile` (py-spy's path) the plane is sampled over the window."""
    start = time.monotonic() + min(interval * 1.5, 15)
    end = start + seconds
    parts = asyncio.gather(*(g.measure(start, end) for g in [*groups, *([probe] if probe else [])]))
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    pids = plane.pids()
    server_cpu = sum(map(process_cpu_s, pids))
    server_queues = [run_queue(pid) for pid in pids]
    profile_file = plane.work / f"plane-profile-{agents}-{interval:g}.txt"
    spy = start_profile(profile, pids[0], seconds, profile_file) if profile else None
    try:
        before = await asyncio.to_thread(plane.histograms)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        server_cpu = sum(map(process_cpu_s, pids)) - server_cpu
        server_queue_shares = [
            run_queue_share(queue, run_queue(pid), seconds)
            for pid, queue in zip(pids, server_queues, strict=True)
        ]
        load = os.getloadavg()[0]
        after = await asyncio.to_thread(plane.histograms)
        measured = await parts
        if spy is not None:
            await asyncio.to_thread(spy.wait, seconds + 60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
    probed = measured.pop() if probe else None
    latencies = [x for m in measured for x in m["latencies"]]
    elapsed = end - start
    res: dict[str, Any] = {
        "window_monotonic_s": [start, end],  # to line up with other logs of the machine
        "offered_per_s": agents / interval,
        # Sent: an agent also probes a path quiet for half its dead-path bound (7.5 s), so
        # intervals past that send more often than offered.
        "sent_per_s": sum(m["sent"] for m in measured) / elapsed,
        "acked_per_s": sum(m["acked"] for m in measured) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "reconnects_in_window": sum(m["reconnects_in_window"] for m in measured),
        "server_cpu_share": server_cpu / elapsed,  # 1.0 = one core busy all the window
        "client_cpu_share": [m["cpu_s"] / elapsed for m in measured],  # per agent process
        # Per agent process: p50 and p99 of how late its event loop ran a 10 ms timer.
        "agents_loop_lag_ms": [m["loop_lag_ms"] for m in measured],
        # The event-loop threads' time runnable but waiting for a CPU (Linux schedstat): the
        # machine's share of every latency. The plane's (one per worker), then one per agent
        # process.
        "plane_main_threads": server_queue_shares,
        "agents_main_threads": [m["main_thread"] for m in measured],
        "agents_open_fds": [m["open_fds"] for m in measured],
        "agents_threads": [m["threads"] for m in measured],
        "load_average_1m": load,
        **_plane_histograms(before, after, setups_before or {}),
    }
    if spy is not None:
        # py-spy takes CPU beside what it measures: profiled runs are not compared with others.
        res["profiled"] = True
        if spy.returncode == 0 and profile_file.exists():
            res["plane_profile"] = profile_summary(profile_file, seconds)
        else:
            print(f"py-spy exited with {spy.returncode}: see {profile_file}.log")
    if probed is not None:
        res |= {
            "probe_connected": probed["connected"],
            "probe_acked": probed["acked"],
            "probe_p50_ms": percentile(probed["latencies"], 0.5) * 1000,
            "probe_p99_ms": percentile(probed["latencies"], 0.99) * 1000,
            "probe_max_ms": max(probed["latencies"], default=float("nan")) * 1000,
            "probe_loop_lag_ms": probed["loop_lag_ms"],
            "probe_main_thread": probed["main_thread"],
        }
    return res


def _plane_histograms(
    before: dict[str, list[tuple[float, float]]],
    after: dict[str, list[tuple[float, float]]],
    setups_before: dict[str, list[tuple[float, float]]],
) -> dict[str, dict[str, float]]:
    """The plane's event-loop lag over the window, and its session setups by phase between
    `setups_before` and the window's start (the scenario's connect, or the storm)."""
    qs = (0.5, 0.99)
    out: dict[str, dict[str, float]] = {}
    lag = "autoglm_event_loop_lag_seconds{}"
    if lag in after:
        out["plane_loop_lag_s"] = histogram_quantiles(before.get(lag, []), after[lag], qs)
    for phase in SETUP_PHASES:
        key = f"autoglm_session_setup_seconds{{phase={phase}}}"
        if key in before:
            out[f"setup_{phase}_s"] = histogram_quantiles(
                setups_before.get(key, []), before[key], qs
            )
    return out


def _histogram(times: list[float]) -> dict[int, int]:
    """Sessions back per second after the kill."""
    counts: dict[int, int] = {}
    for t in times:
        counts[int(t)] = counts.get(int(t), 0) + 1
    return counts


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default="100@0.1,1000@0.2,1000@10,5000@10",
        help="comma-separated AGENTS@INTERVAL_SECONDS",
    )
    parser.add_argument(
        "--storm",
        default="1000@1",
        help="comma-separated AGENTS@INTERVAL_SECONDS restart storms ('' for none)",
    )
    parser.add_argument("--converge-timeout", type=float, default=300.0)
    parser.add_argument(
        "--storm-rounds", type=int, default=2, help="rounds of each policy, alternated"
    )
    parser.add_argument(
        "--policies",
        default="old,new",
        help="restart storms: the reconnect policies to alternate (old, new)",
    )
    parser.add_argument(
        "--agent-processes",
        type=int,
        default=0,
        help="spread the agents over N worker processes (0: this one)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="shortest measurement window")
    parser.add_argument(
        "--probe-agents",
        type=int,
        default=20,
        help="agents in a process of their own, measured beside the fleet (0: none)",
    )
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument(
        "--profile-plane",
        action="store_true",
        help="steady-state scenarios: sample the plane (with --workers, worker 0) with py-spy "
        "over the window",
    )
    parser.add_argument(
        "--ramp-per-s",
        type=float,
        default=RAMP_PER_S,
        help="steady-state scenarios: sessions started a second, all agent processes together",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the plane's processes (`cloud serve --workers N`; more than one needs "
        "--database-url)",
    )
    parser.add_argument(
        "--database-url", default="", help="an empty PostgreSQL database (default: SQLite)"
    )
    parser.add_argument("--ping-concurrency", type=int, default=100)
    parser.add_argument(
        "--fleet-nice",
        type=int,
        default=0,
        help="run the fleet's agent processes at this nice value (positive: behind the plane, "
        "the probes and the database; with --agent-processes): how much of the tail is the "
        "plane sharing two cores with the simulated fleet",
    )
    parser.add_argument(
        "--ping-server", nargs=2, metavar=("STATE", "PORTS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--storm-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ramp_per_s <= 0:
        parser.error(f"--ramp-per-s: {args.ramp_per_s:g}; give a positive rate")
    if args.fleet_nice and not (1 <= args.fleet_nice <= 19 and args.agent_processes):
        parser.error(
            f"--fleet-nice {args.fleet_nice}: give 1 to 19 (behind the plane; 0: off), "
            "with --agent-processes N (N > 0)"
        )
    if args.workers < 1 or (args.workers > 1 and not args.database_url):
        parser.error(f"--workers {args.workers}: give 1, or more with --database-url")
    spy = (py_spy() or "") if args.profile_plane else ""
    if args.profile_plane and not spy:
        parser.error("--profile-plane needs py-spy (a dev dependency: make setup)")
    # Thousands of agents each saying "reconnecting" would drown the result lines.
    logging.getLogger("edge_agent.session").setLevel(logging.ERROR)
    if args.ping_server:
        asyncio.run(serve_ping(Path(args.ping_server[0]), Path(args.ping_server[1])))
        return 0
    if args.storm_worker:
        work, first, count, interval, policy = args.storm_worker
        asyncio.run(serve_worker(Path(work), int(first), int(count), float(interval), policy))
        return 0

    policies = [p for p in args.policies.split(",") if p]
    if not policies or set(policies) - set(POLICIES):
        parser.error(f"--policies: a comma-separated list of {', '.join(POLICIES)}")
    scenarios = _pairs(args.scenarios)
    storms = _pairs(args.storm)
    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    agents_at = (
        f"{args.agent_processes} processes (1 event loop each)"
        if args.agent_processes
        else "this process (1 event loop)"
    )
    served = f"{args.workers} processes" if args.workers > 1 else "own process"
    database = "PostgreSQL" if args.database_url else "SQLite"
    niced = f", nice {args.fleet_nice}" if args.fleet_nice else ""
    env_note = f"{os.cpu_count()} cores; agents: {agents_at}{niced}; server: {served}, {database}"
    print(f"heartbeat benchmark ({env_note})")
    settings = {"workers": args.workers} if args.workers > 1 else {}
    plane = start_plane_process(work, settings, args.database_url)  # idle during the baseline
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
        probes = Probes(plane.work, args.probe_agents, args.probe_interval)
        enroll_fleet(plane, PROBE_FIRST, args.probe_agents)
        storms_out: list[dict[str, object]] = []
        for m, interval in scenarios:
            t0 = time.monotonic()
            if m > len(enrolled):
                enrolled += enroll_fleet(plane, len(enrolled), m - len(enrolled))
            enroll_s = time.monotonic() - t0
            window = max(args.seconds, 2 * interval)
            res = asyncio.run(
                run_sessions(
                    enrolled[:m],
                    interval,
                    window,
                    plane,
                    args.agent_processes,
                    probes,
                    args.ramp_per_s,
                    spy,
                    args.fleet_nice,
                )
            )
            res["enroll_s"] = enroll_s
            res["ratio_vs_ping"] = res["acked_per_s"] / base["per_s"]
            results.append(res)
            print(scenario_lines(m, res))
        for m, interval in storms:
            if m > len(enrolled):
                enrolled += enroll_fleet(plane, len(enrolled), m - len(enrolled))
            window = max(args.seconds, 2 * interval)
            for policy in policies * args.storm_rounds:
                storm = asyncio.run(
                    run_storm(
                        enrolled[:m],
                        interval,
                        window,
                        plane,
                        args.converge_timeout,
                        policy,
                        args.agent_processes,
                        probes,
                        args.fleet_nice,
                    )
                )
                storms_out.append(storm)
                print(storm_line(storm))
    finally:
        plane.stop()
    print(
        json.dumps({"baseline_ping": base, "heartbeats": results, "storms": storms_out}, indent=1)
    )
    return 0


def _pairs(text: str) -> list[tuple[int, float]]:
    return [(int(m), float(i)) for m, i in (x.split("@") for x in text.split(",") if x)]


if __name__ == "__main__":
    sys.exit(main())
