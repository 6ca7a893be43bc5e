"""Modbus TCP in: one thread per device polls the register maps of its assets every
`period_s` and hands the readings, stamped with the poll's time, to the same queue as MQTT
ingest (chunks of one sensor each, counted like every other reading).

Each table (holding, input) is read in as few requests as the maps allow (at most 125
registers each, through holes of at most 8); a value is `raw * scale + offset`, raw decoded
as int16, uint16, int32, uint32 or float32 in the configured word order. An unreachable
device (refused, timed out) or an exception answer is counted per register
(`modbus_unreachable`, `modbus_exception`) and polled again after the project's jittered
backoff; it never stops the agent. An answer with fewer registers than asked (pymodbus
takes it as it comes) leaves the sensors past its end without a reading: counted as
`modbus_exception` too, and logged once a minute.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pymodbus.client.tcp
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from edge_agent.config import ModbusRegister, ModbusSource
from edge_agent.ingest import wide_select
from edge_agent.ingest.decode import Chunk, Decoder, TopicRoutes, value_reason
from edge_agent.retry import Backoff

log = logging.getLogger(__name__)
wide_select.install(pymodbus.client.tcp)  # its reads wait with select(): any descriptor
# pymodbus logs every refused connection as an error; the poller counts and logs them itself
# (once a minute per reason, with backoff between attempts).
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)
MODBUS_DROPS = (
    "modbus_unreachable",  # no connection or no answer: every register of the poll counts
    "modbus_exception",  # a Modbus exception answer (bad address, busy), or a short one
)
SHORT_LOG_EVERY_S = 60.0
MAX_REGISTERS = 125  # per read request (the protocol's limit)
MAX_GAP = 8  # unmapped registers read through between two maps (more: a separate read, as
# many devices answer "illegal data address" for holes in their map)
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_TYPES = {
    "int16": ModbusTcpClient.DATATYPE.INT16,
    "uint16": ModbusTcpClient.DATATYPE.UINT16,
    "int32": ModbusTcpClient.DATATYPE.INT32,
    "uint32": ModbusTcpClient.DATATYPE.UINT32,
    "float32": ModbusTcpClient.DATATYPE.FLOAT32,
}


@dataclass(frozen=True)
class Slot:
    asset: int
    sensor: int  # schema slot; -1: unknown (counted as unknown_sensor)
    register: ModbusRegister


def spans(registers: Sequence[ModbusRegister]) -> list[tuple[int, int]]:
    """(first address, count) reads covering every register, each at most MAX_REGISTERS and
    reading through at most MAX_GAP unmapped registers."""
    reads: list[tuple[int, int]] = []
    for r in sorted(registers, key=lambda r: r.address):
        end = r.address + WIDTH[r.type]
        if reads and end - reads[-1][0] <= MAX_REGISTERS and r.address - sum(reads[-1]) <= MAX_GAP:
            first, count = reads[-1]
            reads[-1] = (first, max(count, end - first))
        else:
            reads.append((r.address, WIDTH[r.type]))
    return reads


def decode_register(words: Sequence[int], register: ModbusRegister) -> float:
    raw = ModbusTcpClient.convert_from_registers(
        list(words), _TYPES[register.type], word_order=register.word_order
    )
    return float(raw) * register.scale + register.offset  # type: ignore[arg-type]


class ModbusPoller:
    """Polls one device (host, port, device id) for the assets that name it."""

    def __init__(
        self,
        source: ModbusSource,
        slots: Sequence[Slot],
        base: Decoder,
        deliver: Callable[[list[Chunk]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.slots = list(slots)
        self.base = base  # its drop counter and accepted count
        self.deliver = deliver
        self.clock = clock
        self.backoff = Backoff(min(1.0, source.period_s), 30.0)
        self.polls = 0
        self.failures = 0
        self.short_answers = 0
        self._short_logged_at = -math.inf
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client = ModbusTcpClient(
            source.host, port=source.port, timeout=source.timeout_s, retries=0
        )
        self._thread = threading.Thread(
            target=self._run, name=f"modbus {source.host}:{source.port}", daemon=True
        )
        self._reads = {
            table: spans([s.register for s in self.slots if s.register.table == table])
            for table in ("holding", "input")
        }

    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """Its thread, for the liveness probe (a thread that died takes readiness with it)."""
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.source.timeout_s + 5)
        self._client.close()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            ok = self.poll_once()
            delay = self.source.period_s if ok else self.backoff.next_delay()
            if ok:
                self.backoff.reset()
            next_at = max(next_at + delay, time.monotonic()) if ok else time.monotonic() + delay
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def poll_once(self) -> bool:
        """One poll of every register; False when the device could not be read at all."""
        with self._lock:  # one request at a time on the connection
            self.polls += 1
            return self._poll()

    def _poll(self) -> bool:
        words: dict[tuple[str, int], int] = {}
        exceptions = shorts = 0
        try:
            if not self._client.connected and not self._client.connect():  # type: ignore[no-untyped-call]
                raise ConnectionError(f"cannot connect to {self.source.host}:{self.source.port}")
            for table, reads in self._reads.items():
                read = (
                    self._client.read_holding_registers
                    if table == "holding"
                    else self._client.read_input_registers
                )
                for first, count in reads:
                    answer = read(first, count=count, device_id=self.source.device_id)
                    if answer.isError():
                        exceptions += 1
                        continue
                    registers = list(answer.registers)
                    if len(registers) < count:
                        shorts += 1
                        self._short(table, first, count, len(registers))
                    for i, word in enumerate(registers[:count]):
                        words[(table, first + i)] = int(word)
        except (ModbusException, OSError, ConnectionError) as exc:
            self.failures += 1
            self._client.close()  # type: ignore[no-untyped-call]
            self.base.drop("modbus_unreachable", self._where(), str(exc).encode(), len(self.slots))
            return False
        at = self.clock()
        chunks = self._chunks(words, at)
        if exceptions or shorts:
            missing = sum(1 for s in self.slots if not self._read(s.register, words))
            what = b"exception answer" if exceptions else b"short answer"
            self.base.drop("modbus_exception", self._where(), what, missing)
        if chunks:
            self.deliver(chunks)
        return True

    def _chunks(self, words: dict[tuple[str, int], int], at: float) -> list[Chunk]:
        chunks = []
        stamp = np.asarray([at], dtype=np.float64)
        for s in self.slots:
            r = s.register
            if not self._read(r, words):
                continue  # its read failed or fell short: counted in _poll
            raw = [words[(r.table, r.address + i)] for i in range(WIDTH[r.type])]
            if s.sensor < 0:
                self.base.drop("unknown_sensor", self._where(), r.sensor.encode())
                continue
            value = decode_register(raw, r)
            reason = value_reason(value)
            if reason:
                self.base.drop(reason, self._where(), r.sensor.encode())
                continue
            chunks.append(Chunk(s.asset, s.sensor, stamp, np.asarray([value], dtype=np.float64)))
            self.base.accepted += 1
        return chunks

    @staticmethod
    def _read(r: ModbusRegister, words: dict[tuple[str, int], int]) -> bool:
        """Whether every word of the register came back."""
        return all((r.table, r.address + i) in words for i in range(WIDTH[r.type]))

    def _short(self, table: str, first: int, count: int, got: int) -> None:
        self.short_answers += 1
        now = time.monotonic()
        if now - self._short_logged_at >= SHORT_LOG_EVERY_S:
            self._short_logged_at = now
            log.warning(
                "modbus: %s answered %d of the %d %s registers asked from %d; the sensors "
                "past its end get no reading (counted as modbus_exception; %d short answer(s)"
                " so far)",
                self._where(),
                got,
                count,
                table,
                first,
                self.short_answers,
            )

    def _where(self) -> str:
        return f"modbus://{self.source.host}:{self.source.port}/{self.source.device_id}"


def pollers(
    assets: Sequence[object],
    routes: TopicRoutes,
    base: Decoder,
    deliver: Callable[[list[Chunk]], None],
) -> list[ModbusPoller]:
    """One poller per Modbus device the assets name (assets may share a device)."""
    by_device: dict[tuple[str, int, int], tuple[ModbusSource, list[Slot]]] = {}
    for i, asset in enumerate(assets):
        source: ModbusSource | None = getattr(asset, "modbus", None)
        if source is None:
            continue
        key = (source.host, source.port, source.device_id)
        _, slots = by_device.setdefault(key, (source, []))
        slots += [Slot(i, routes.sensor(i, r.sensor), r) for r in source.registers]
    return [ModbusPoller(src, slots, base, deliver) for src, slots in by_device.values()]
