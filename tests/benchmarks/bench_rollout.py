"""A rollout of one bundle to N light in-process agents: time to 100 % and control-plane
CPU, next to the same fleet downloading the same files with no rollout in the same run.

    python tests/benchmarks/bench_rollout.py [--agents 500] [--waves 1,10%,50%,100%]

The control plane runs in its own process (`autoglm cloud serve`, SQLite, the rollout loop
at --interval). Each light agent is the real client code without a model runtime: a
CloudSession (mutual TLS, heartbeats, desired states, reports) and, per desired state, the
agent's own `fetch_verified` (manifest and signature checked with the pinned key, the
variant's files downloaded by digest and verified) into its own directory, then an install
report. The baseline: the same agents fetch the same files at once with `fetch_verified`,
no control plane logic in the way. Zero soak, so the figure is orchestration plus transfer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.state_dir import load_secrets
from edge_agent.config import ModelChoice
from edge_agent.download import Downloader
from edge_agent.enroll import channel_options
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from edge_agent.session import CloudSession
from edge_agent.updates import InstallFailed, fetch_verified, install_report
from protos.autoglm.v1 import agent_pb2, common_pb2, operator_pb2
from tests.benchmarks.fleet import (
    PlaneProcess,
    enroll_fleet,
    process_cpu_s,
    start_plane_process,
)
from tests.support.bundles import make_version, train_small

OUTCOME = agent_pb2.InstallReport.Outcome


class LightAgent:
    """A session and the agent's install path, minus opening the model."""

    def __init__(self, identity: DeviceIdentity, root: Path, version: str) -> None:
        self.identity = identity
        self.root = root
        self.version = version
        key = serialization.load_pem_public_key(identity.signing_public_pem)
        assert isinstance(key, ed25519.Ed25519PublicKey)
        self.key = key
        self.downloader = Downloader(
            identity.info.device_address,
            identity.credentials(),
            channel_options(identity.info.tls_server_name),
            Backoff(0.2, 2.0),
        )
        self.session = CloudSession(
            identity,
            status=lambda: agent_pb2.AgentStatus(model_version=self.version),
            host=lambda: common_pb2.HostFacts(hostname="bench", arch="x86_64"),
            backoff=Backoff(0.5, 5),
            heartbeat_interval_s=10,
            on_control=self._on_control,
        )
        self.tasks: set[asyncio.Task[None]] = set()

    def _on_control(self, message: agent_pb2.ControlMessage) -> None:
        if message.WhichOneof("body") == "desired":
            task = asyncio.get_running_loop().create_task(self.install(message.desired))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def install(self, d: agent_pb2.DesiredState) -> None:
        outcome: int
        if d.model_version == self.version:
            outcome, detail = OUTCOME.OUTCOME_INSTALLED, "serving"
        else:
            directory = self.root / f"v{d.model_version}"
            directory.mkdir(parents=True, exist_ok=True)
            try:
                await fetch_verified(self.downloader, directory, d, self.key, ModelChoice())
                self.version = d.model_version
                outcome, detail = OUTCOME.OUTCOME_INSTALLED, "verified"
            except InstallFailed as exc:
                outcome, detail = exc.outcome, str(exc)
        self.session.post(install_report(d.model_version, d.rollout_id, outcome, detail))


async def run(
    plane: PlaneProcess, agents: list[LightAgent], args: argparse.Namespace
) -> dict[str, Any]:
    stop = asyncio.Event()
    sessions = [asyncio.create_task(a.session.run(stop)) for a in agents]
    started = time.monotonic()
    while sum(a.session.connected for a in agents) < len(agents):
        if time.monotonic() - started > 120:
            raise SystemExit("agents did not all connect in 120 s")
        await asyncio.sleep(0.1)
    connect_s = time.monotonic() - started
    await asyncio.sleep(2)
    # Idle cost of the sessions, to tell the rollout's own CPU from the fleet's.
    cpu0, t0 = process_cpu_s(plane.proc.pid), time.monotonic()
    await asyncio.sleep(args.idle_seconds)
    idle_cpu_per_s = (process_cpu_s(plane.proc.pid) - cpu0) / (time.monotonic() - t0)

    with plane.client() as client:
        request = operator_pb2.CreateRolloutRequest(
            model_name="pump",
            model_version="2",
            selector="bench=1",
            waves=args.waves.split(","),
            soak_seconds=0,
        )
        cpu0, t0 = process_cpu_s(plane.proc.pid), time.monotonic()
        rollout_id = (await asyncio.to_thread(client.create_rollout, request)).id
        while True:
            rollout = await asyncio.to_thread(client.get_rollout, rollout_id)
            if rollout.state != operator_pb2.Rollout.STATE_RUNNING:
                break
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"the rollout did not finish in {args.timeout} s")
            await asyncio.sleep(0.1)
        rollout_s = time.monotonic() - t0
        rollout_cpu = process_cpu_s(plane.proc.pid) - cpu0
    updated = sum(d.state == "updated" for d in rollout.devices)
    on_v2 = sum(a.version == "2" for a in agents)
    stop.set()
    await asyncio.gather(*sessions)
    return {
        "state": operator_pb2.Rollout.State.Name(rollout.state),
        "connect_s": connect_s,
        "rollout_s": rollout_s,
        "updated": updated,
        "agents_on_new_version": on_v2,
        "plane_cpu_s": rollout_cpu,
        "plane_cpu_s_beyond_idle": rollout_cpu - idle_cpu_per_s * rollout_s,
        "plane_idle_cpu_per_s": idle_cpu_per_s,
    }


async def baseline(agents: list[LightAgent], desired: agent_pb2.DesiredState) -> float:
    """Seconds for every agent to fetch and verify the bundle at once, no rollout."""
    t0 = time.monotonic()
    await asyncio.gather(
        *(
            fetch_verified(a.downloader, a.root / "baseline", desired, a.key, ModelChoice())
            for a in agents
        )
    )
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--waves", default="1,10%,50%,100%")
    parser.add_argument("--interval", type=float, default=0.5, help="rollout loop period (s)")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-rollout-"))
    plane = start_plane_process(work, {"rollout_interval_s": args.interval})
    try:
        signing = load_secrets(plane.state).signing_key
        trained = train_small(work / "model")
        v1 = make_version(trained, work / "v1", "1", signing)
        v2 = make_version((v1, signing), work / "v2", "2", signing)
        with plane.client() as client:
            client.push_bundle(v1)
            model = client.push_bundle(v2)
        size = sum(f.stat().st_size for f in v2.iterdir())
        t0 = time.monotonic()
        identities = enroll_fleet(plane, 0, args.agents, {"bench": "1"})
        enroll_s = time.monotonic() - t0
        agents = [
            LightAgent(ident, work / "agents" / f"{i:05d}" / "models", "1")
            for i, ident in enumerate(identities)
        ]
        print(
            f"rollout benchmark: {args.agents} light agents in this process, control plane in "
            f"its own ({os.cpu_count()} cores); bundle {size / 1024:.0f} KiB; waves "
            f"{args.waves}; loop every {args.interval}s; enrolled in {enroll_s:.0f}s"
        )
        desired = agent_pb2.DesiredState(
            model_name="pump",
            model_version="2",
            manifest_digest=model.manifest_digest,
            signature_digest=model.signature_digest,
        )
        base_s = asyncio.run(baseline(agents, desired))
        for a in agents:
            shutil.rmtree(a.root / "baseline")
        print(f"baseline: {args.agents} agents fetch and verify the bundle at once: {base_s:.2f}s")
        result = asyncio.run(run(plane, agents, args))
    finally:
        plane.stop()
    result.update(agents=args.agents, waves=args.waves, baseline_fetch_s=base_s)
    result["ratio_vs_baseline"] = result["rollout_s"] / base_s
    print(
        f"rollout {result['state']}: {result['updated']}/{args.agents} updated in "
        f"{result['rollout_s']:.2f}s ({result['ratio_vs_baseline']:.1f}x the plain fetch; "
        f"{len(args.waves.split(','))} waves at a {args.interval}s loop); control-plane CPU "
        f"{result['plane_cpu_s']:.2f}s ({result['plane_cpu_s_beyond_idle']:.2f}s beyond the "
        f"idle sessions' {result['plane_idle_cpu_per_s']:.3f}s/s)"
    )
    print(json.dumps(result, indent=1))
    return 0 if result["state"] == "STATE_SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
