"""A Modbus TCP device for tests: pymodbus's own server and simulator device (a shared
register block), serving the rows a test sets as float32 or scaled int16 registers, in its
own event loop thread; it can be stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from cloud.local_broker import free_port
from cloud.loop_thread import end_loop
from edge_agent.config import load_agent_config
from edge_agent.ingest.decode import Chunk, Decoder, TopicRoutes
from edge_agent.ingest.modbus import ModbusPoller, pollers


class Plc:
    """Registers: sensor j at holding address 2*j, float32, big word order; except that
    `int16_scale` sensors hold round(value / scale) as int16 in one register."""

    def __init__(self, sensors: Sequence[str], int16_scale: dict[str, float] | None = None):
        self.sensors = list(sensors)
        self.int16_scale = dict(int16_scale or {})
        self.row = [0.0] * len(self.sensors)
        self.port = free_port()
        self.reads = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None
        self._thread: threading.Thread | None = None

    def registers(self) -> list[int]:
        words = [0] * (2 * len(self.sensors))
        for j, (name, value) in enumerate(zip(self.sensors, self.row, strict=True)):
            if name in self.int16_scale:
                raw = ModbusTcpClient.convert_to_registers(
                    round(value / self.int16_scale[name]), ModbusTcpClient.DATATYPE.INT16
                )
            else:
                raw = ModbusTcpClient.convert_to_registers(value, ModbusTcpClient.DATATYPE.FLOAT32)
            words[2 * j : 2 * j + len(raw)] = raw
        return words

    async def _action(
        self, _fc: int, start: int, _address: int, _count: int, current: list[int], *_: Any
    ) -> None:
        """pymodbus's hook on every access: the registers show the current row."""
        self.reads += 1
        for i, word in enumerate(self.registers()):
            if 0 <= i - start < len(current):
                current[i - start] = word

    def start(self) -> Plc:
        device = SimDevice(
            id=1,
            simdata=[SimData(0, count=2 * len(self.sensors) + 8, datatype=DataType.REGISTERS)],
            action=self._action,
        )
        ready = threading.Event()

        async def serve() -> None:
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            await self._server.serve_forever(background=True)  # bound when this returns
            ready.set()
            await self._server.serving

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, name="plc", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._server is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._thread.join(10)
        if not self._thread.is_alive():  # its executor and selector go too
            end_loop(self._loop, self._thread)


def modbus_poller(
    state_dir: Path, port: int, registers: list[dict[str, Any]], sensors: Sequence[str]
) -> tuple[ModbusPoller, Decoder, list[list[Chunk]]]:
    """The agent's poller of one asset, pump-1, reading `registers` from 127.0.0.1:`port`;
    its decoder and the chunks it delivers."""
    source = {"host": "127.0.0.1", "port": port, "registers": registers}
    config = load_agent_config(
        None, {"state_dir": state_dir, "assets": [{"name": "pump-1", "modbus": source}]}
    )
    routes = TopicRoutes(config.assets, list(sensors))
    base = Decoder(routes, config.ingest)
    got: list[list[Chunk]] = []
    (poller,) = pollers(config.assets, routes, base, got.append)
    return poller, base, got
