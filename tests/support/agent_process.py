"""`autoglm-edge run` in a child process, for tests that kill it (kill -9) or stop it
(SIGTERM) like an init system would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class AgentProcess:
    """`autoglm-edge run` in a child process; its log goes to a file per start."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-c", "from edge_agent.cli import main; main()", "run"]
        with (self.logs / f"agent-{self.starts}.log").open("wb") as log:  # the child keeps it
            self.proc = subprocess.Popen(
                [*command, "--config", str(self.config), "--log-level", "INFO"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log(self) -> str:
        return (self.logs / f"agent-{self.starts}.log").read_text(errors="replace")
