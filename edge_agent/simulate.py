"""`autoglm-edge simulate`: sensor streams for trying the agent without a plant.

Either a synthetic centrifugal pump (the eight SKAB testbed sensors, driven by one load
signal, with injectable faults), or a CSV file (such as a SKAB experiment) replayed.
Readings are stamped with this machine's clock: a replay keeps the file's spacing and ends
"now" at 1x speed; faster speeds publish the same timestamps sooner, so a stream never lies
in the future. Single readings go to `<prefix>/<sensor>`, batches to `<prefix>/batch`.
"""

from __future__ import annotations

import csv
import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from edge_agent.errors import InvalidInput
from edge_agent.ingest.decode import parse_timestamp
from edge_agent.windowing import FloatArray, TimeArray

PUMP_SENSORS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
FAULTS = ("cavitation", "bearing", "overheat")
_SKIP = {"anomaly", "changepoint", "label"}


@dataclass(frozen=True)
class Fault:
    kind: str
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Stream:
    """Rows to publish: offsets in seconds from the first row, values [R, N] (NaN: none)."""

    sensors: tuple[str, ...]
    offsets: TimeArray
    values: FloatArray
    faults: tuple[Fault, ...] = ()


def pump_stream(
    seconds: int, faults: Sequence[Fault], seed: int = 0, period_s: float = 1.0
) -> Stream:
    """A pump at 1 Hz: a shared load drives flow, pressure, current; faults bend them."""
    if seconds < 1:
        raise InvalidInput(f"simulate: duration {seconds}s is too short")
    for f in faults:
        if f.kind not in FAULTS:
            raise InvalidInput(f"simulate: unknown fault {f.kind!r}; use one of {list(FAULTS)}")
    rng = np.random.default_rng(seed)
    rows = int(seconds / period_s)
    t: TimeArray = np.arange(rows, dtype=np.float64) * period_s
    load = 0.5 * np.sin(2 * np.pi * t / 90 + rng.uniform(0, 6)) + 0.05 * rng.standard_normal(rows)
    noise = rng.standard_normal((rows, 8))
    x = np.stack(
        [
            0.027 + 0.002 * load + 0.0008 * noise[:, 0],
            0.040 + 0.003 * load + 0.0010 * noise[:, 1],
            1.9 + 0.5 * load + 0.08 * noise[:, 2],
            0.30 + 0.08 * load + 0.01 * noise[:, 3],
            70.0 + 0.5 * load + 0.05 * noise[:, 4],
            25.5 + 0.2 * load + 0.03 * noise[:, 5],
            230.0 + 4.0 * load + 1.0 * noise[:, 6],
            32.0 + 3.0 * load + 0.3 * noise[:, 7],
        ],
        axis=1,
    )
    for f in faults:
        inside = (t >= f.start_s) & (t < f.start_s + f.duration_s)
        ramp = np.clip((t - f.start_s) / max(1.0, f.duration_s / 4), 0, 1)[inside]
        if f.kind == "cavitation":  # flow and pressure fall, vibration rises
            x[inside, 7] -= 9.0 * ramp
            x[inside, 3] -= 0.12 * ramp
            x[inside, 0] += 0.010 * ramp
            x[inside, 1] += 0.012 * ramp
        elif f.kind == "bearing":  # vibration grows, current rises a little
            x[inside, 0] += 0.015 * ramp
            x[inside, 1] += 0.020 * ramp
            x[inside, 2] += 0.3 * ramp
        else:  # overheat: temperature and thermocouple climb
            x[inside, 4] += 6.0 * ramp
            x[inside, 5] += 4.0 * ramp
    return Stream(PUMP_SENSORS, t, x.astype(np.float32), tuple(faults))


def read_csv_stream(path: Path, time_column: str = "datetime") -> Stream:
    """A CSV (`,` or `;`) with a time column (ISO 8601 or epoch seconds) and numeric sensors;
    label columns (anomaly, changepoint) are not published. Errors name FILE:LINE."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise InvalidInput(f"{path}: no data rows")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader)
    if time_column not in header:
        raise InvalidInput(f"{path}:1: no time column {time_column!r} (columns: {header})")
    ti = header.index(time_column)
    columns = [i for i, name in enumerate(header) if i != ti and name not in _SKIP]
    times: list[float] = []
    rows: list[list[float]] = []
    for lineno, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise InvalidInput(
                f"{path}:{lineno}: {len(cells)} fields, the header has {len(header)}"
            )
        times.append(_parse_time(cells[ti], path, lineno))
        try:
            rows.append([float(cells[i]) if cells[i] != "" else math.nan for i in columns])
        except ValueError:
            raise InvalidInput(f"{path}:{lineno}: a sensor value is not a number") from None
    offsets: TimeArray = np.asarray(times, dtype=np.float64)
    offsets = (offsets - offsets[0]).astype(np.float64)
    if np.any(np.diff(offsets) < 0):
        raise InvalidInput(f"{path}: timestamps are not in ascending order")
    return Stream(tuple(header[i] for i in columns), offsets, np.asarray(rows, dtype=np.float32))


def _parse_time(cell: str, path: Path, lineno: int) -> float:
    try:
        raw: object = float(cell)
    except ValueError:
        raw = cell
    ts = parse_timestamp(raw)
    if ts is None:
        raise InvalidInput(f"{path}:{lineno}: unreadable timestamp {cell!r}")
    return ts


def messages(
    stream: Stream, prefix: str, anchor: float, batch: int
) -> Iterator[tuple[float, str, bytes]]:
    """(offset, topic, payload) in publishing order. batch <= 1: one reading per message."""
    ts = anchor + stream.offsets
    n = len(stream.sensors)
    if batch <= 1:
        for r in range(stream.values.shape[0]):
            for j in range(n):
                v = float(stream.values[r, j])
                if math.isnan(v):
                    continue
                payload = orjson.dumps({"ts": round(float(ts[r]), 6), "value": v})
                yield float(stream.offsets[r]), f"{prefix}/{stream.sensors[j]}", payload
        return
    for start in range(0, stream.values.shape[0], batch):
        stop = min(start + batch, stream.values.shape[0])
        block = stream.values[start:stop]
        values = {
            stream.sensors[j]: [float(v) for v in block[:, j]]
            for j in range(n)
            if not np.isnan(block[:, j]).any()
        }
        payload = orjson.dumps(
            {"ts": [round(float(t), 6) for t in ts[start:stop]], "values": values}
        )
        yield float(stream.offsets[stop - 1]), f"{prefix}/batch", payload


def publish_streams(
    publish: Callable[[str, bytes], None],
    streams: Sequence[tuple[str, Stream]],
    speed: float,
    batch: int = 1,
    on_sent: Callable[[int, float, float], None] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Publishes (prefix, stream) pairs interleaved in time at `speed` x real time (0: as fast
    as possible); returns messages sent. `on_sent(stream index, offset, timestamp)` follows
    each message."""
    if speed < 0:
        raise InvalidInput(f"simulate: speed must be >= 0, got {speed}")
    started = clock()

    def anchor(stream: Stream) -> float:
        duration = float(stream.offsets[-1]) if stream.offsets.size else 0.0
        # Faster than real time, the last row is stamped with the time its replay ends, so no
        # reading is ever stamped after it is published; slower, the first row is stamped now.
        if speed == 0:
            return started - duration
        return started - duration * (1.0 - 1.0 / speed) if speed >= 1 else started

    anchors = [anchor(stream) for _, stream in streams]

    def tagged(i: int) -> Iterator[tuple[float, int, str, bytes]]:
        prefix, stream = streams[i]
        for offset, topic, payload in messages(stream, prefix, anchors[i], batch):
            yield offset, i, topic, payload

    queues = [tagged(i) for i in range(len(streams))]
    sent = 0
    for offset, i, topic, payload in heapq.merge(*queues, key=lambda m: m[0]):
        if speed > 0:
            wait = started + offset / speed - clock()
            if wait > 0:
                sleep(wait)
        publish(topic, payload)
        sent += 1
        if on_sent is not None:
            on_sent(i, offset, anchors[i] + offset)
    return sent
