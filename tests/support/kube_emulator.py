"""The kmock Kubernetes API emulator (PyPI `kmock`) on a loopback port in its own thread:
it stores objects and answers the API as a cluster would, but runs no controllers, so a
test plays the Job controller itself (`finish_job`). An emulator, not a cluster."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kmock
import yaml

JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")


class KubeEmulator:
    def __init__(self, emulator: Any, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.emulator = emulator
        self.url = str(server.url).rstrip("/")
        self.loop = loop

    def call(self, fn: Any) -> Any:
        """Runs `fn()` on the emulator's loop (its objects are not thread-safe)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def jobs(self, namespace: str) -> dict[str, dict[str, Any]]:
        def read() -> dict[str, dict[str, Any]]:
            return {
                key[2]: dict(obj.raw)
                for key, obj in self.emulator.objects.items()
                if key[0] == JOBS and key[1] == namespace and not obj.deleted
            }

        return dict(self.call(read))

    def finish_job(self, namespace: str, name: str, succeeded: bool, log: str) -> None:
        """What the Job controller and kubelet would do: a pod with a log, then the result."""
        pod = f"{name}-x7k2p"

        def act() -> None:
            self.emulator.objects[PODS, namespace, pod] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace, "labels": {"job-name": name}},
            }
            self.emulator[f"get /api/v1/namespaces/{namespace}/pods/{pod}/log"] << log
            status: dict[str, Any] = {"succeeded": 1} if succeeded else {
                "failed": 1,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"}
                ],
            }  # fmt: skip
            self.emulator.objects[JOBS, namespace, name].patch({"status": status})

        self.call(act)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "emulator"}}],
                    "contexts": [
                        {"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path


@contextmanager
def kube_emulator(extra_resources: tuple[str, ...] | list[str] = ()) -> Iterator[KubeEmulator]:
    box: dict[str, Any] = {}
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    def main() -> None:
        async def run() -> None:
            done = asyncio.Event()
            stop.append(done)
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
                emulator.resources["batch/v1/jobs"] = {}
                emulator.resources["v1/pods"] = {}
                for extra in extra_resources:
                    emulator.resources[extra] = {}
                box["emulator"] = KubeEmulator(emulator, server, asyncio.get_running_loop())
                ready.set()
                await done.wait()

        asyncio.run(run())

    thread = threading.Thread(target=main, name="kmock", daemon=True)
    thread.start()
    if not ready.wait(15):
        raise RuntimeError("the kmock emulator did not start")
    emulator: KubeEmulator = box["emulator"]
    try:
        yield emulator
    finally:
        emulator.loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
