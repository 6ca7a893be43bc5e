"""Modbus TCP in: register maps and their decoding, then a real agent data path polling
pymodbus's own server (float32 and scaled int16 registers) to windows, a scored prediction
and an alert on an injected fault, through a device restart (counted, resumed)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.config import ModbusRegister, load_agent_config
from edge_agent.errors import ConfigError
from edge_agent.ingest.decode import Chunk, Decoder, TopicRoutes
from edge_agent.ingest.modbus import ModbusPoller, Slot, decode_register, pollers, spans
from tests.support.agents import wait_for
from tests.support.broker import Broker
from tests.support.bundles import train_small
from tests.support.datapath import pump
from tests.support.plc import Plc, modbus_poller
from tests.support.sensordata import SENSORS
from tests.support.site_agent import SiteAgent
from tests.support.sparkplug_peers import read_fault, start_host

SCALED = {SENSORS[0]: 0.01}  # the first sensor as int16 hundredths, the rest float32


def _registers() -> list[dict[str, Any]]:
    return [
        {"sensor": s, "address": 2 * j, "type": "int16", "scale": SCALED[s]}
        if s in SCALED
        else {"sensor": s, "address": 2 * j, "type": "float32"}
        for j, s in enumerate(SENSORS)
    ]


def _config(tmp_path: Path, port: int, **extra: Any) -> Any:
    source = {"host": "127.0.0.1", "port": port, "period_s": 3600, "registers": _registers()}
    return load_agent_config(
        None,
        {"state_dir": tmp_path / "agent", "assets": [{"name": "pump-1", "modbus": source}],
         **extra},
    )  # fmt: skip


def test_reads_are_grouped_and_values_decoded() -> None:
    regs = [ModbusRegister(sensor=f"s{i}", address=a, type="float32") for i, a in
            enumerate([0, 2, 10, 200, 300, 322])]  # fmt: skip
    assert spans(regs) == [(0, 12), (200, 2), (300, 2), (322, 2)]
    word = ModbusRegister(sensor="t", address=0, type="int16", scale=0.5, offset=10)
    assert decode_register([0xFFFE], word) == 9.0  # -2 * 0.5 + 10
    little = ModbusRegister(sensor="f", address=0, type="float32", word_order="little")
    assert decode_register([0, 16464], little) == 3.25
    assert decode_register([2, 0], ModbusRegister(sensor="u", address=0, type="uint32")) == 2**17
    with pytest.raises(ValidationError, match="past 65535"):
        ModbusRegister(sensor="x", address=65535, type="float32")


def test_an_unreachable_device_is_counted_not_fatal(tmp_path: Path) -> None:
    config = _config(tmp_path, port=1)  # nothing listens on port 1
    routes = TopicRoutes(config.assets, SENSORS)
    base = Decoder(routes, config.ingest)
    got: list[list[Chunk]] = []
    (poller,) = pollers(config.assets, routes, base, got.append)
    assert isinstance(poller, ModbusPoller) and all(isinstance(s, Slot) for s in poller.slots)
    assert poller.poll_once() is False and got == []
    assert base.drops["modbus_unreachable"] == len(SENSORS)
    with pytest.raises(ConfigError, match="mapped twice"):
        _config(tmp_path, 1, assets=[{"name": "p", "modbus": {
            "host": "h", "registers": [{"sensor": "a", "address": 0}] * 2}}])  # fmt: skip


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_poller_thread_that_dies_is_reported_for_the_probes(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.sources import Sources

    config = _config(tmp_path, port=1, mqtt={"host": "127.0.0.1", "port": broker.port})
    routes = TopicRoutes(config.assets, SENSORS)
    sources = Sources(config, config.assets, "c-1", routes, Decoder(routes, config.ingest),
                      lambda _: None, [])  # fmt: skip

    def bug(self: ModbusPoller) -> bool:
        raise RuntimeError("a bug in the poll")

    monkeypatch.setattr(ModbusPoller, "poll_once", bug)
    sources.start()
    try:
        # /healthz/live and /healthz/ready name every dead thread (edge_agent/metrics.py).
        wait_for(lambda: sources.threads_alive() == {"modbus 127.0.0.1:1 #0": False}, timeout=30)
    finally:
        sources.stop()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_pymodbus_device_drives_the_agent_to_an_alert_through_a_restart(
    tmp_path: Path, broker: Broker
) -> None:
    bundle, key = train_small(tmp_path / "model")
    plc = Plc(SENSORS, SCALED).start()
    config = _config(
        tmp_path,
        plc.port,
        mqtt={"host": "127.0.0.1", "port": broker.port},
        model={"bundle": bundle},
        decisions={"clear_at": 0.95},
        sparkplug_out={"group": "plant", "edge_node": "autoglm-1"},
    )
    agent = SiteAgent(tmp_path, config, bundle, key)
    runtime = agent.runtime
    (poller,) = runtime.modbus
    reader, lines = start_host(broker.port, "autoglm-1")  # a SCADA host reads the alert
    rows = np.vstack([pump(200, faulty=False, seed=1), pump(150, faulty=True, seed=2)])
    plc.row = [float(v) for v in rows[0]]
    anchor = time.time() - rows.shape[0] - 10
    stamp = {"at": anchor}
    poller.clock = lambda: stamp["at"]  # the poll's time: one row per second of data
    try:
        runtime.start()  # its thread polls once, then every hour: the test drives the polls
        wait_for(lambda: poller.polls >= 1, timeout=30)
        with poller._lock:  # the thread's first poll is done
            pass
        for i in range(rows.shape[0]):
            plc.row = [float(v) for v in rows[i]]
            stamp["at"] = anchor + i
            assert wait_for(lambda: poller.poll_once(), timeout=30) >= 0
            if i == 100:  # the device restarts: the polls in between are counted as failed
                plc.stop()
                assert poller.poll_once() is False
                plc = Plc(SENSORS, SCALED)
                plc.port = config.assets[0].modbus.port
                plc.start()
        accepted = runtime.decoder.accepted  # and the thread's own first poll, of row 0
        assert accepted == (rows.shape[0] + 1) * len(SENSORS), accepted
        assert runtime.decoder.drops["modbus_unreachable"] == len(SENSORS)
        first = agent.first_alert(after=anchor + 200)
        assert read_fault(lines)["metrics"]["autoglm/score"] == first.score
        assert plc.reads > 0  # the restarted device served the rest
    finally:
        reader.kill()
        agent.close()
        plc.stop()


def test_the_simulator_serves_the_stream_as_a_plc(tmp_path: Path) -> None:
    import threading

    from cloud.local_broker import free_port
    from edge_agent.simulate import pump_stream
    from edge_agent.simulate_servers import serve_modbus

    stream = pump_stream(3, [], seed=1)
    port = free_port()
    said: list[str] = []
    threading.Thread(
        target=serve_modbus, args=("127.0.0.1", port, [stream], 1.0, said.append), daemon=True
    ).start()
    registers = [
        {"sensor": s, "address": 2 * j, "type": "float32"} for j, s in enumerate(stream.sensors)
    ]
    source = {"host": "127.0.0.1", "port": port, "registers": registers}
    config = load_agent_config(
        None, {"state_dir": tmp_path, "assets": [{"name": "pump-1", "modbus": source}]}
    )
    routes = TopicRoutes(config.assets, list(stream.sensors))
    base = Decoder(routes, config.ingest)
    got: list[list[Chunk]] = []
    (poller,) = pollers(config.assets, routes, base, got.append)
    wait_for(lambda: poller.poll_once(), timeout=30)
    values = sorted((c.sensor, float(c.values[0])) for c in got[-1])
    assert len(values) == len(stream.sensors) and said and "float32 @ 0" in said[0]
    expected = [float(np.float32(v)) for v in stream.values[0]]
    assert [v for _, v in values] == pytest.approx(expected, rel=1e-6), values


class ShortDevice:
    """pymodbus's own server whose register answers carry only the first `keep` registers
    asked (no exception code: a device or gateway that answers short)."""

    def __init__(self, keep: int) -> None:
        import asyncio
        import threading

        from pymodbus.pdu import ModbusPDU
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        from cloud.local_broker import free_port

        self.port = free_port()
        self.answers = 0

        def short(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
            if sending and pdu.registers:
                self.answers += 1
                pdu.registers = [7, *pdu.registers[1:keep]]
            return pdu

        device = SimDevice(id=1, simdata=[SimData(0, count=16, datatype=DataType.REGISTERS)])
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:  # the server is made in its loop
            address = ("127.0.0.1", self.port)
            self.server = ModbusTcpServer(device, address=address, trace_pdu=short)
            await self.server.serve_forever(background=True)
            ready.set()
            await self.server.serving

        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(serve(),), daemon=True
        )
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.thread.join(10)


def test_a_short_answer_counts_the_sensors_it_leaves_without_a_reading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = ShortDevice(keep=1)
    registers = [
        {"sensor": SENSORS[0], "address": 0, "type": "int16"},
        {"sensor": SENSORS[1], "address": 1, "type": "int16"},
        {"sensor": SENSORS[2], "address": 2, "type": "float32"},
    ]  # one read of 4 registers, answered with 1
    poller, base, got = modbus_poller(tmp_path, device.port, registers, SENSORS)
    caplog.set_level(logging.WARNING, logger="edge_agent.ingest.modbus")
    try:
        for _ in range(3):
            assert poller.poll_once() is True  # the device answered: not a failed poll
    finally:
        device.stop()
    readings = [(c.sensor, float(c.values[0])) for batch in got for c in batch]
    assert device.answers == 3 and readings == [(0, 7.0)] * 3, readings
    assert {k: v for k, v in base.drops.items() if v} == {"modbus_exception": 2 * 3}
    lines = [r.getMessage() for r in caplog.records if "answered 1 of the 4" in r.getMessage()]
    assert len(lines) == 1 and poller.short_answers == 3, lines
