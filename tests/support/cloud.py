"""A real control plane for tests: initialised state dir, gRPC over TLS on port 0, in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloud.client import Connection, OperatorClient
from cloud.config import CloudConfig, load_cloud_config
from cloud.loop_thread import end_loop
from cloud.service.server import ControlPlane
from cloud.state_dir import InitResult, init_state_dir, load_secrets
from cloud.store import open_store


@dataclass
class RunningPlane:
    """Handles to a control plane running in a background event loop."""

    plane: ControlPlane
    config: CloudConfig
    token: str
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def api_address(self) -> str:
        return f"localhost:{self.plane.api_port}"

    @property
    def device_address(self) -> str:
        return f"localhost:{self.plane.device_port}"

    @property
    def ca_pem(self) -> bytes:
        return self.plane.secrets.trusted_ca_pem  # both CAs during a CA change

    def connection(self, token: str | None = None) -> Connection:
        return Connection(
            server=self.api_address, ca_pem=self.ca_pem, token=token or self.token, timeout_s=10
        )

    def client(self, token: str | None = None) -> OperatorClient:
        return OperatorClient(self.connection(token))

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def flush_presence(self) -> None:
        self.plane.presence.flush()

    def stop(self) -> None:
        self.call(self.plane.stop(0.5))
        end_loop(self.loop, self.thread)
        self.plane.store.close()


def init_plane(state_dir: Path, database_url: str = "") -> InitResult:
    return init_state_dir(
        state_dir,
        hosts=["localhost", "127.0.0.1"],
        database_url=database_url,
        api_listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
    )


def start_plane(state_dir: Path, token: str, **overrides: Any) -> RunningPlane:
    config = load_cloud_config(state_dir, overrides)
    plane = ControlPlane(config, load_secrets(state_dir), open_store(config.resolved_database_url))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="control-plane", daemon=True)
    thread.start()
    running = RunningPlane(plane=plane, config=config, token=token, loop=loop, thread=thread)
    running.call(plane.start())
    return running


# The backends a plane fixture runs on: `@pytest.fixture(params=BACKENDS)`.
BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


def plane_on_backend(
    request: pytest.FixtureRequest, tmp_path: Path, **overrides: Any
) -> Iterator[RunningPlane]:
    """A running plane on the backend `request.param` names (BACKENDS), stopped after."""
    database = request.getfixturevalue("pg_url") if request.param == "postgres" else ""
    cloud_dir = tmp_path / "cloud"
    running = start_plane(cloud_dir, init_plane(cloud_dir, database).operator_token, **overrides)
    yield running
    running.stop()
