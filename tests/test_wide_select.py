"""The agent's MQTT and Modbus connections work when the process holds more than 1,024
descriptors (paho and pymodbus wait with select(), which stops at FD_SETSIZE)."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_agent.config import load_agent_config
from edge_agent.ingest.decode import Decoded
from edge_agent.ingest.mqtt import MqttConnection, new_client
from edge_agent.ingest.wide_select import poll_select
from tests.support.agents import wait_for
from tests.support.broker import Broker
from tests.support.plc import Plc, modbus_poller
from tests.support.sensordata import SENSORS

ABOVE = 1100  # descriptors held, so that the next socket's number is past FD_SETSIZE (1024)


@contextmanager
def descriptors_held(count: int = ABOVE) -> Iterator[None]:
    """Holds `count` open descriptors, raising the soft limit where it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    assert hard == resource.RLIM_INFINITY or hard >= want, f"hard descriptor limit {hard}"
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.unit
def test_poll_select_keeps_the_contract_of_select() -> None:
    a, b = socket.socketpair()
    try:
        assert poll_select([a], [], [], 0) == ([], [], [])
        assert poll_select([a], [a], [], 0) == ([], [a], [])
        b.send(b"x")
        assert poll_select([a, b], [], [], 1.0) == ([a], [], [])
        assert poll_select([a.fileno()], [], [], 0) == ([a.fileno()], [], [])
        b.close()  # a hang-up reads as readable, as select reports it
        a.recv(1)
        assert poll_select([a], [], [], 1.0) == ([a], [], [])
        with pytest.raises(ValueError, match="non-negative"):
            poll_select([a], [], [], -1)
    finally:
        a.close()
    with pytest.raises(ValueError, match="negative integer"):
        poll_select([a], [], [], 0)  # closed: fileno() is -1, which paho expects as an error
    with pytest.raises(TypeError):
        poll_select([object()], [], [], 0)


@pytest.mark.integration
def test_the_broker_connection_works_past_1024_descriptors(tmp_path: Path, broker: Broker) -> None:
    config = load_agent_config(
        None, {"state_dir": tmp_path, "mqtt": {"host": "127.0.0.1", "port": broker.port}}
    )
    got: list[str] = []

    def decode(topic: str, payload: bytes) -> Decoded | None:
        got.append(f"{topic}={payload.decode()}")
        return None

    with descriptors_held():
        connection = MqttConnection(config.mqtt, "agent-wide", ["t/#"], decode, lambda _: None)
        connection.start()
        sender = new_client()
        try:
            wait_for(connection.connected.is_set, timeout=60)
            fd = connection.client.socket().fileno()  # type: ignore[union-attr]
            assert fd > 1024, fd
            sender.connect("127.0.0.1", broker.port)
            sender.loop_start()
            sender.publish("t/1", b"hello", qos=1).wait_for_publish(30)
            wait_for(lambda: got == ["t/1=hello"], timeout=60)
        finally:
            sender.disconnect()
            sender.loop_stop()
            connection.stop()


@pytest.mark.integration
def test_a_modbus_device_is_read_past_1024_descriptors(tmp_path: Path) -> None:
    plc = Plc(SENSORS).start()
    try:
        plc.row = [float(j) + 0.5 for j in range(len(SENSORS))]
        registers = [
            {"sensor": s, "address": 2 * j, "type": "float32"} for j, s in enumerate(SENSORS)
        ]
        poller, base, got = modbus_poller(tmp_path, plc.port, registers, SENSORS)
        with descriptors_held():
            wait_for(poller.poll_once, timeout=60)
        values = {c.sensor: float(c.values[0]) for c in got[-1]}
        assert values == dict(enumerate(plc.row)), (values, base.drops)
    finally:
        plc.stop()
