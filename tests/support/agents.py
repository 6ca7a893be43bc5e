"""Helpers that run the real agent code (enrollment, session) against a test control plane."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud.loop_thread import end_loop
from edge_agent.agent import Agent
from edge_agent.bootstrap import Bootstrap
from edge_agent.config import AgentConfig
from edge_agent.enroll import enroll
from edge_agent.identity import DeviceIdentity, load_identity
from edge_agent.retry import Backoff
from edge_agent.session import DEAD_AFTER_S, SETUP_TIMEOUT_S, CloudSession
from edge_agent.sync import RecordSync
from protos.autoglm.v1 import agent_pb2, common_pb2


def enroll_identity(bootstrap: Bootstrap, state_dir: Path) -> DeviceIdentity:
    enroll(bootstrap, state_dir)
    return load_identity(state_dir)


@dataclass
class SessionThread:
    """A CloudSession running in its own event loop thread, as the agent runs it."""

    session: CloudSession
    stop_event: asyncio.Event
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)
        if not self.thread.is_alive():
            end_loop(self.loop, self.thread)


def start_session(
    identity: DeviceIdentity,
    heartbeat_interval_s: float = 0.2,
    model_version: str = "",
    sync: RecordSync | None = None,
    device_address: str = "",
    on_control: Callable[[agent_pb2.ControlMessage], None] | None = None,
    dead_after_s: float = DEAD_AFTER_S,
    setup_timeout_s: float = SETUP_TIMEOUT_S,
) -> SessionThread:
    loop = asyncio.new_event_loop()
    stop_event = asyncio.Event()
    session = CloudSession(
        identity,
        status=lambda: agent_pb2.AgentStatus(model_version=model_version),
        host=lambda: common_pb2.HostFacts(hostname="test-host", arch="x86_64"),
        backoff=Backoff(0.1, 0.5),
        heartbeat_interval_s=heartbeat_interval_s,
        sync=sync,
        device_address=device_address,
        tls_server_name="localhost" if device_address else "",
        on_control=on_control,
        dead_after_s=dead_after_s,
        setup_timeout_s=setup_timeout_s,
    )

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(session.run(stop_event))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return SessionThread(session, stop_event, loop, thread)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> float:
    """Polls until `condition()` holds; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


@dataclass
class AgentThread:
    """A whole agent (edge_agent.agent.Agent) running in its own event loop thread."""

    agent: Agent
    stop_event: asyncio.Event
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the agent did not stop"
        end_loop(self.loop, self.thread)


def start_agent(config: AgentConfig) -> AgentThread:
    agent = Agent(config)
    loop = asyncio.new_event_loop()
    stop_event = asyncio.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(agent.run(stop_event))

    thread = threading.Thread(target=main, name="agent", daemon=True)
    thread.start()
    return AgentThread(agent, stop_event, loop, thread)
