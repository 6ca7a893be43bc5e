"""`autoglm-edge simulate --protocol modbus|opcua`: the simulated streams served the way a
PLC serves them, for an agent to poll or subscribe to.

- Modbus TCP: asset i is device (unit) id i; sensor j is a float32 (big word order) at
  holding and input register 2*j. Each read answers the row due at that moment.
- OPC UA (security None, a lab setup): asset i is object `Pump<i>` in namespace
  `urn:autoglm:simulator`, sensor s its Double variable `ns=2;s=Pump<i>.<s>`, written row by
  row with the row's source timestamp.

Both print the register map or node ids, then serve until the streams end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.simulate import Stream

PrintFn = Callable[[str], None]


def _row_at(stream: Stream, elapsed_s: float) -> int:
    """The last row due `elapsed_s` (stream seconds) after the start."""
    import numpy as np

    return max(0, int(np.searchsorted(stream.offsets, elapsed_s, side="right")) - 1)


def _duration(streams: Sequence[Stream]) -> float:
    return max(float(s.offsets[-1]) if s.offsets.size else 0.0 for s in streams)


def serve_modbus(host: str, port: int, streams: Sequence[Stream], speed: float,
                 say: PrintFn = print) -> int:  # fmt: skip
    from pymodbus.client import ModbusTcpClient
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    started = time.monotonic()

    def words(stream: Stream) -> list[int]:
        row = stream.values[_row_at(stream, (time.monotonic() - started) * speed)]
        out: list[int] = []
        for value in row:  # a gap stays NaN: the poller counts it, never a real 0.0
            out += ModbusTcpClient.convert_to_registers(
                float(value), ModbusTcpClient.DATATYPE.FLOAT32
            )
        return out

    def device(i: int, stream: Stream) -> SimDevice:
        async def action(
            _fc: int, start: int, _a: int, _c: int, current: list[int], *_: Any
        ) -> None:
            for k, word in enumerate(words(stream)):
                if 0 <= k - start < len(current):
                    current[k - start] = word

        size = 2 * len(stream.sensors) + 8
        return SimDevice(id=i, simdata=[SimData(0, count=size, datatype=DataType.REGISTERS)],
                         action=action)  # fmt: skip

    for i, stream in enumerate(streams, start=1):
        regs = ", ".join(f"{s} float32 @ {2 * j}" for j, s in enumerate(stream.sensors))
        say(f"modbus device {i} at {host}:{port}: {regs}")

    async def serve() -> None:
        server = ModbusTcpServer([device(i, s) for i, s in enumerate(streams, 1)],
                                 address=(host, port))  # fmt: skip
        await server.serve_forever(background=True)
        await asyncio.sleep(_duration(streams) / speed + 1)
        await server.shutdown()  # type: ignore[no-untyped-call]

    asyncio.run(serve())
    return sum(s.values.shape[0] for s in streams)


def serve_opcua(host: str, port: int, streams: Sequence[Stream], speed: float,
                say: PrintFn = print) -> int:  # fmt: skip
    from asyncua import ua
    from asyncua.server.server import Server

    async def serve() -> int:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://{host}:{port}/")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace("urn:autoglm:simulator")
        variables = []
        for i, stream in enumerate(streams, start=1):
            pump = await server.nodes.objects.add_object(idx, f"Pump{i}")
            names = [ua.NodeId(ua.String(f"Pump{i}.{s}"), ua.Int16(idx)) for s in stream.sensors]
            variables.append([await pump.add_variable(n, s, 0.0)
                              for n, s in zip(names, stream.sensors, strict=True)])  # fmt: skip
            say(f"opc ua object Pump{i} at opc.tcp://{host}:{port}/: "
                + ", ".join(f"ns={idx};s=Pump{i}.{s}" for s in stream.sensors))  # fmt: skip
        written = 0
        async with server:
            started = time.time()
            anchor = started - _duration(streams) * (1.0 - 1.0 / speed) if speed >= 1 else started
            rows = [0] * len(streams)
            while any(r < s.values.shape[0] for r, s in zip(rows, streams, strict=True)):
                elapsed = (time.time() - started) * speed
                for k, stream in enumerate(streams):
                    while rows[k] < stream.values.shape[0] and stream.offsets[rows[k]] <= elapsed:
                        at = anchor + float(stream.offsets[rows[k]])
                        stamp = dt.datetime.fromtimestamp(at, dt.UTC).replace(tzinfo=None)
                        for var, value in zip(variables[k], stream.values[rows[k]], strict=True):
                            if value == value:
                                await var.write_value(_stamped(float(value), stamp))
                        rows[k] += 1
                        written += 1
                await asyncio.sleep(0.01)
        return written

    return asyncio.run(serve())


def _stamped(value: float, stamp: dt.datetime) -> Any:
    from asyncua import ua

    variant = ua.Variant(value, ua.VariantType.Double)
    return ua.DataValue(variant, SourceTimestamp=stamp, ServerTimestamp=stamp)  # type: ignore[arg-type]
