"""systemd's notify protocol against a real datagram socket: READY=1 from a running agent,
the watchdog fed while the data path lives and not once it is dead."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.config import load_agent_config
from edge_agent.systemd import Notifier
from tests.conftest import register
from tests.support.agents import enroll_identity, start_agent
from tests.support.broker import Broker, start_broker
from tests.support.cloud import RunningPlane

pytestmark = [pytest.mark.integration]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


def test_outside_systemd_nothing_is_sent() -> None:
    assert not Notifier(env={}).notify("READY=1")
    assert Notifier(env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s == 0


def test_the_watchdog_is_fed_only_while_the_data_path_lives(
    tmp_path: Path, listener: socket.socket
) -> None:
    notifier = Notifier(
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    )
    alive = [True]

    async def scenario() -> list[bytes]:
        stop = asyncio.Event()
        task = asyncio.create_task(notifier.watchdog(lambda: alive[0], stop))
        first = await asyncio.to_thread(listener.recv, 64)
        alive[0] = False
        await asyncio.sleep(0.3)  # a ping under way when it died may still land
        listener.setblocking(False)
        while True:
            try:
                listener.recv(64)
            except BlockingIOError:
                break
        listener.settimeout(1.0)  # five watchdog periods: nothing more may come
        try:
            late = [await asyncio.to_thread(listener.recv, 64)]
        except TimeoutError:
            late = []
        stop.set()
        await task
        return [first, *late]

    assert asyncio.run(scenario()) == [b"WATCHDOG=1"]


def test_a_running_agent_says_ready(
    plane: RunningPlane,
    tmp_path: Path,
    listener: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker: Broker = start_broker(tmp_path / "broker")
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1"), state)
    config = load_agent_config(
        None,
        {
            "state_dir": state,
            "mqtt": {"port": broker.port, "host": "127.0.0.1"},
            "metrics": {"listen": ""},
        },
    )
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    running = start_agent(config)
    try:
        assert listener.recv(64) == b"READY=1"
    finally:
        running.stop()
        broker.stop()
    assert listener.recv(64) == b"STOPPING=1"
