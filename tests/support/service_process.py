"""A server binary the tests start on a free port and wait for: Prometheus, Alertmanager.
It logs to DIRECTORY/<name>.log; `ready_path` answers once it serves."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from cloud.local_broker import free_port


class ServiceProcess:
    def __init__(
        self,
        names: Sequence[str],
        package: str,
        directory: Path,
        args: Callable[[int], list[str]],
        ready_path: str = "/-/ready",
    ) -> None:
        binary = next((b for b in map(shutil.which, names) if b), None)
        if binary is None:
            raise RuntimeError(f"{names[0]} is not installed (apt-get install {package})")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log_path = directory / f"{names[0]}.log"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, *args(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while not self._ready(ready_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{names[0]} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
