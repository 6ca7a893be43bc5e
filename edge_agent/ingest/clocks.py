"""Stream clocks: how far an asset's timestamps, and each of its sensors', run from this
device's clock.

An asset's readings are judged against its stream clock (`Decoder.bounds`). Where its sensors
arrive on their own topics, each sensor has a clock too, and the asset's is the middle of
theirs where two or more of them send most of its messages (otherwise, and for a sensor left
alone when the others went silent, the asset's own clock decides): one sensor whose clock
is skewed (an hour ahead while the others are right) cannot move it, even on a two-sensor
asset or when that sensor sends most of the messages. Such a
sensor is reported (`skews`: health `sensor_clock_offset_s`, a log line every CLOCK_LOG_S):
its readings are judged against the asset's clock, so they are dropped as `ts_future` or
`late` -- counted, and now said with the sensor's name and offset.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left, insort
from collections import Counter, deque
from collections.abc import Sequence

log = logging.getLogger(__name__)

CLOCK_MESSAGES = 31  # messages in an asset's stream-clock median
CLOCK_MIN_MESSAGES = 8  # before that many, readings are judged by the device's clock alone
SENSOR_SKEW_S = 10.0  # a sensor this far from its asset's other sensors is reported
CLOCK_LOG_S = 600.0  # ... and logged at most this often per sensor
SENSOR_CLOCK_AGE = 4 * CLOCK_MESSAGES  # a sensor unseen for this many asset messages is forgotten


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
    def median(self) -> float:
        """The median of the messages it has, however few (0 before the first)."""
        ordered = self._sorted
        if not ordered:
            return 0.0
        half = len(ordered) // 2
        return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2

    @property
    def offset(self) -> float:
        return self.median if self.ready else 0.0


def middle(offsets: Sequence[float]) -> float:
    """The median of sorted `offsets`; of an even count, the middle one nearer this device's
    clock (two sensors an hour apart: the device's clock decides, not their average)."""
    half = len(offsets) // 2
    if len(offsets) % 2:
        return offsets[half]
    return min(offsets[half - 1], offsets[half], key=abs)


class SensorClocks:
    """One StreamClock per (asset, sensor) and the asset's clock they agree on. Written by
    the decoding thread; `skews` is read by the health report (a copy, swapped whole).

    They decide only where they can: two or more sensors seen among the asset's last
    CLOCK_MESSAGES messages, whose own messages are most of those. Otherwise (an asset that
    sends all its sensors in one message, a lone survivor of sensors that went silent)
    `offset` is None and the asset's own StreamClock decides. A sensor not seen for
    SENSOR_CLOCK_AGE messages of its asset is forgotten."""

    def __init__(self, assets: Sequence[str], sensors: Sequence[str]) -> None:
        self.assets = list(assets)
        self.sensors = list(sensors)
        self._clocks: list[dict[int, StreamClock]] = [{} for _ in self.assets]
        self._last_seen: list[dict[int, int]] = [{} for _ in self.assets]
        # The asset's last CLOCK_MESSAGES messages: the sensor each was one sensor's, or -1.
        self._recent: list[deque[int]] = [deque() for _ in self.assets]
        self._in_recent: list[Counter[int]] = [Counter() for _ in self.assets]
        self._combined: list[float | None] = [None] * len(self.assets)
        self._seen = [0] * len(self.assets)
        self._logged: dict[tuple[int, int], float] = {}
        self.skews: dict[str, float] = {}  # "asset/sensor": seconds from the asset's clock

    def observe(self, asset: int, sensor: int, offset: float) -> None:
        """A message of `asset`; `sensor` >= 0 where it was that one sensor's alone."""
        seen = self._seen[asset] = self._seen[asset] + 1
        recent, counts = self._recent[asset], self._in_recent[asset]
        changed = False
        if len(recent) == CLOCK_MESSAGES:
            gone = recent.popleft()
            counts[gone] -= 1
            changed = gone >= 0 and counts[gone] == 0  # a sensor left the recent messages
        recent.append(sensor)
        counts[sensor] += 1
        if sensor >= 0:
            clocks = self._clocks[asset]
            clock = clocks.get(sensor)
            if clock is None:
                clock = clocks[sensor] = StreamClock()
            clock.observe(offset)
            self._last_seen[asset][sensor] = seen
            changed = changed or counts[sensor] == 1  # new among the recent messages
        if changed or seen % CLOCK_MIN_MESSAGES == 0:
            self._agree(asset)

    def offset(self, asset: int) -> float | None:
        """The asset's clock as its sensors agree on it; None where they cannot decide (the
        asset's own StreamClock does)."""
        return self._combined[asset]

    def _forget_silent(self, asset: int) -> None:
        last_seen, clocks = self._last_seen[asset], self._clocks[asset]
        for sensor in [
            s for s, n in last_seen.items() if self._seen[asset] - n >= SENSOR_CLOCK_AGE
        ]:
            del last_seen[sensor], clocks[sensor]

    def _decide(self, asset: int) -> tuple[float | None, dict[int, float]]:
        """(the agreed offset or None, the ready clocks it was agreed from)."""
        counts = self._in_recent[asset]
        live = {s: c for s, c in self._clocks[asset].items() if counts[s] > 0}
        if len(live) < 2 or sum(counts[s] for s in live) * 2 <= len(self._recent[asset]):
            return None, {}
        ready = {s: c.offset for s, c in live.items() if c.ready}
        if len(ready) >= 2:
            return middle(sorted(ready.values())), ready
        # Not yet CLOCK_MIN_MESSAGES each: the middle of what each has sent so far, so one
        # skewed sensor cannot move the asset's clock while the others are still counting.
        return middle(sorted(c.median for c in live.values())), {}

    def _agree(self, asset: int) -> None:
        self._forget_silent(asset)
        combined, ready = self._decide(asset)
        self._combined[asset] = combined
        prefix = f"{self.assets[asset]}/"
        skews = {k: v for k, v in self.skews.items() if not k.startswith(prefix)}
        now = time.monotonic()
        for sensor, offset in ready.items():
            skew = offset - combined  # type: ignore[operator]  # ready: combined is set
            if abs(skew) < SENSOR_SKEW_S:
                continue
            skews[prefix + self.sensors[sensor]] = round(skew, 1)
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
