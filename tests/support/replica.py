"""A control-plane replica as its own `autoglm cloud serve` process (kill -9 able), on
fixed ports so that a restarted one is found where its devices look for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cloud.client import Connection, OperatorClient
from cloud.local_broker import free_port
from cloud.state_dir import load_secrets
from tests.support.agents import wait_for

BIN = Path(sys.executable).parent


class Replica:
    def __init__(
        self, state: Path, name: str, work: Path, env: dict[str, str] | None = None
    ) -> None:
        self.state = state
        self.name = name
        self.work = work
        self.extra_env = env or {}
        self.api_port, self.device_port = free_port(), free_port()
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        ports = self.work / f"{self.name}.ports.json"
        ports.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
        env |= {"AUTOGLM_CLOUD_REPLICA_ID": self.name, **self.extra_env}
        listen = ["--api-listen", f"127.0.0.1:{self.api_port}",
                  "--device-listen", f"127.0.0.1:{self.device_port}"]  # fmt: skip
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "autoglm"), "cloud", "serve", "--state-dir", str(self.state),
                 *listen, "--ports-file", str(ports)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        wait_for(lambda: ports.exists() or self.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert ports.exists(), self.log.read_text()
        json.loads(ports.read_text())

    @property
    def device_address(self) -> str:
        return f"localhost:{self.device_port}"

    def client(self, token: str) -> OperatorClient:
        ca = load_secrets(self.state).ca.cert_pem
        return OperatorClient(
            Connection(server=f"localhost:{self.api_port}", ca_pem=ca, token=token, timeout_s=20)
        )

    def leads(self) -> bool:
        return "now leads" in self.log.read_text()

    def kill(self) -> None:
        """kill -9: no lease released, no session closed, nothing flushed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
