"""Sparkplug B peers made with a third-party library (pysparkplug, in .venv-sparkplug):
the host that reads an edge node's DDATA and NDEATH back (tests/peers/sparkplug_host.py),
and a reader of the JSON lines such a peer prints."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = ROOT / ".venv-sparkplug" / "bin" / "python"


class Lines:
    """The JSON lines a peer process prints, read by a thread (a wait never blocks forever)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                self.queue.put(json.loads(line))

        threading.Thread(target=read, daemon=True).start()

    def next(self, wanted: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                doc = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if wanted(doc):
                return doc
            seen.append(doc)
        raise AssertionError(f"no such line within {timeout_s} s; saw {seen}")


def start_host(port: int, node: str, group: str = "plant") -> tuple[subprocess.Popen[str], Lines]:
    """The third-party host, subscribed to `group/node`'s messages (ready when it returns)."""
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"{PEER_PYTHON} is missing: run `make setup`")
    proc = subprocess.Popen(
        [str(PEER_PYTHON), str(ROOT / "tests" / "peers" / "sparkplug_host.py"),
         "--port", str(port), "--group", group, "--node", node],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = Lines(proc)
    lines.next(lambda doc: doc.get("event") == "ready", timeout_s=30)
    return proc, lines


def read_fault(lines: Lines, asset: str = "pump-1", node: str = "autoglm-1") -> dict[str, Any]:
    """The next DDATA of the agent's device `asset` that says a fault is open."""
    topic = f"spBv1.0/plant/DDATA/{node}/{asset}"
    return lines.next(
        lambda doc: doc.get("topic") == topic and doc["metrics"].get("autoglm/fault") is True,
        timeout_s=30,
    )
