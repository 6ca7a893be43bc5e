"""Stream clocks: how far an asset's timestamps, and each of its sensors', run from this
device's clock.

An asset's readings are judged against its stream clock (`Decoder.bounds`). Where its sensors
arrive on their own topics, each sensor has a clock too, and the asset's is the middle of
theirs: one sensor whose clock is skewed (an hour ahead while the others are right) cannot
move it, even on a two-sensor asset or when that sensor sends most of the messages. Such a
sensor is reported (`skews`: health `sensor_clock_offset_s`, a log line every CLOCK_LOG_S):
its readings are judged against the asset's clock, so they are dropped as `ts_future` or
`late` -- counted, and now said with the sensor's name and offset.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence

log = logging.getLogger(__name__)

CLOCK_MESSAGES = 31  # messages in an asset's stream-clock median
CLOCK_MIN_MESSAGES = 8  # before that many, readings are judged by the device's clock alone
SENSOR_SKEW_S = 10.0  # a sensor this far from its asset's other sensors is reported
CLOCK_LOG_S = 600.0  # ... and logged at most this often per sensor


class StreamClock:
    """How far one asset's timestamps run from this device's clock: the median offset of its
    last messages, so one outlier cannot move it while a sustained offset (a sensor clock an
    hour ahead, or stepped back) is followed after a few messages instead of dropping
    everything. Readings are judged against the device's clock plus this offset."""

    def __init__(self) -> None:
        self._offsets: deque[float] = deque()  # the last CLOCK_MESSAGES, oldest first
        self._sorted: list[float] = []  # the same, in order: the median is read, not sorted

    def observe(self, offset: float) -> None:
        if len(self._offsets) == CLOCK_MESSAGES:
            del self._sorted[bisect_left(self._sorted, self._offsets.popleft())]
        self._offsets.append(offset)
        insort(self._sorted, offset)

    @property
    def ready(self) -> bool:
        return len(self._sorted) >= CLOCK_MIN_MESSAGES

    @property
    def offset(self) -> float:
        ordered = self._sorted
        if len(ordered) < CLOCK_MIN_MESSAGES:
            return 0.0
        half = len(ordered) // 2
        return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def middle(offsets: Sequence[float]) -> float:
    """The median of sorted `offsets`; of an even count, the middle one nearer this device's
    clock (two sensors an hour apart: the device's clock decides, not their average)."""
    half = len(offsets) // 2
    if len(offsets) % 2:
        return offsets[half]
    return min(offsets[half - 1], offsets[half], key=abs)


class SensorClocks:
    """One StreamClock per (asset, sensor) and the asset's clock they agree on. Written by
    the decoding thread; `skews` is read by the health report (a copy, swapped whole)."""

    def __init__(self, assets: Sequence[str], sensors: Sequence[str]) -> None:
        self.assets = list(assets)
        self.sensors = list(sensors)
        self._clocks: list[dict[int, StreamClock]] = [{} for _ in self.assets]
        self._combined: list[float | None] = [None] * len(self.assets)
        self._seen = [0] * len(self.assets)
        self._logged: dict[tuple[int, int], float] = {}
        self.skews: dict[str, float] = {}  # "asset/sensor": seconds from the asset's clock

    def observe(self, asset: int, sensor: int, offset: float) -> None:
        clocks = self._clocks[asset]
        clock = clocks.get(sensor)
        if clock is None:
            clock = clocks[sensor] = StreamClock()
        clock.observe(offset)
        self._seen[asset] += 1
        if self._seen[asset] % CLOCK_MIN_MESSAGES == 0 or self._combined[asset] is None:
            self._agree(asset)

    def offset(self, asset: int) -> float | None:
        """The asset's clock as its sensors agree on it: None where no message was one
        sensor's; this device's clock (0) until two sensors (or all it has) have a clock."""
        if not self._clocks[asset]:
            return None
        combined = self._combined[asset]
        return 0.0 if combined is None else combined

    def _agree(self, asset: int) -> None:
        clocks = self._clocks[asset]
        ready = {s: c.offset for s, c in clocks.items() if c.ready}
        if len(ready) < min(2, len(clocks)) or not ready:
            return
        combined = middle(sorted(ready.values()))
        self._combined[asset] = combined
        skews = dict(self.skews)
        now = time.monotonic()
        for sensor, offset in ready.items():
            name = f"{self.assets[asset]}/{self.sensors[sensor]}"
            skew = offset - combined
            if abs(skew) < SENSOR_SKEW_S:
                skews.pop(name, None)
                continue
            skews[name] = round(skew, 1)
            if now - self._logged.get((asset, sensor), -CLOCK_LOG_S) >= CLOCK_LOG_S:
                self._logged[(asset, sensor)] = now
                log.warning(
                    "the clock of sensor %s of %s runs %+.0f s from its other sensors' (median "
                    "of its last messages): its readings are judged by the asset's clock and "
                    "dropped (ts_future or late, counted) until the sensor's clock is set",
                    self.sensors[sensor],
                    self.assets[asset],
                    skew,
                )
        self.skews = skews
