"""Stream clocks: how far an asset's timestamps, and each of its sensors', run from this
device's clock.

An asset's readings are judged against its stream clock (`Decoder.bounds`). Where its sensors
arrive on their own topics, each sensor has a clock too, and the asset's is the middle of
those of its live sensors -- seen within a few of their own intervals, by the receiving
clock -- where two or more are live and single-sensor messages are most of the asset's
(otherwise, and for a sensor left alone when the others went silent, the asset's own clock
decides): one sensor whose clock is skewed (an hour ahead while the others are right) cannot
move it, even on a two-sensor asset or when that sensor sends most of the messages (ten a
second while the others send one every ten seconds). Such a
sensor is reported (`skews`: health `sensor_clock_offset_s`, a log line every CLOCK_LOG_S):
its readings are judged against the asset's clock, so they are dropped as `ts_future` or
`late` -- counted, and now said with the sensor's name and offset.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

CLOCK_MESSAGES = 31  # messages in an asset's stream-clock median
CLOCK_MIN_MESSAGES = 8  # before that many, readings are judged by the device's clock alone
SENSOR_SKEW_S = 10.0  # a sensor this far from its asset's other sensors is reported
CLOCK_LOG_S = 600.0  # ... and logged at most this often per sensor
# A sensor is live while seen within SENSOR_LIVE_INTERVALS of its own mean interval (over its
# last CLOCK_MESSAGES messages), and at least SENSOR_LIVE_MIN_S, by the receiving clock; one
# unseen for SENSOR_FORGET_SPANS times that is forgotten.
SENSOR_LIVE_INTERVALS = 4.0
SENSOR_LIVE_MIN_S = 60.0
SENSOR_FORGET_SPANS = 4.0


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


class _Sensor:
    """One sensor's clock and when its last messages came (by the receiving clock)."""

    __slots__ = ("clock", "times")

    def __init__(self) -> None:
        self.clock = StreamClock()
        self.times: deque[float] = deque(maxlen=CLOCK_MESSAGES)

    def live_s(self) -> float:
        """How long after its last message it still counts as live."""
        times = self.times
        if len(times) < 2:
            return SENSOR_LIVE_MIN_S
        interval = (times[-1] - times[0]) / (len(times) - 1)
        return max(SENSOR_LIVE_INTERVALS * interval, SENSOR_LIVE_MIN_S)

    def age(self, now: float) -> float:
        return abs(now - self.times[-1])  # abs: a receiving clock stepped back


class SensorClocks:
    """One StreamClock per (asset, sensor) and the asset's clock they agree on. Written by
    the decoding thread; `skews` is read by the health report (a copy, swapped whole).

    They decide only where they can: two or more live sensors (seen within a few of their
    own intervals, by `clock` or the `now` each message is given), and single-sensor
    messages most of the asset's last CLOCK_MESSAGES. Otherwise (an asset that sends all its
    sensors in one message, a lone survivor of sensors that went silent) `offset` is None
    and the asset's own StreamClock decides. Liveness is by time, not by message count: a
    sensor sending ten times a second does not push one sending every ten seconds out. A
    sensor unseen for SENSOR_FORGET_SPANS of its live span is forgotten, so an asset holds
    at most one clock per sensor of the schema, and only those of sensors still sending."""

    def __init__(
        self,
        assets: Sequence[str],
        sensors: Sequence[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.assets = list(assets)
        self.sensors = list(sensors)
        self.clock = clock  # the receiving clock, where `observe` is not given `now`
        self._clocks: list[dict[int, _Sensor]] = [{} for _ in self.assets]
        # The asset's last CLOCK_MESSAGES messages: whether each was one sensor's alone.
        self._recent: list[deque[bool]] = [deque() for _ in self.assets]
        self._singles = [0] * len(self.assets)  # ... how many were
        self._expires = [math.inf] * len(self.assets)  # when the first live sensor is not
        self._combined: list[float | None] = [None] * len(self.assets)
        self._seen = [0] * len(self.assets)
        self._logged: dict[tuple[int, int], float] = {}
        self.skews: dict[str, float] = {}  # "asset/sensor": seconds from the asset's clock

    def observe(self, asset: int, sensor: int, offset: float, now: float | None = None) -> None:
        """A message of `asset`, received at `now` (default: `clock()`); `sensor` >= 0 where
        it was that one sensor's alone."""
        if now is None:
            now = self.clock()
        seen = self._seen[asset] = self._seen[asset] + 1
        recent, single = self._recent[asset], sensor >= 0
        if len(recent) == CLOCK_MESSAGES:
            self._singles[asset] -= recent.popleft()
        recent.append(single)
        changed = False
        if single:
            self._singles[asset] += 1
            clocks = self._clocks[asset]
            entry = clocks.get(sensor)
            if entry is None:
                entry = clocks[sensor] = _Sensor()
                changed = True
            else:  # back after a silence (not live): agree again now
                age = abs(now - entry.times[-1])
                changed = age > SENSOR_LIVE_MIN_S and age > entry.live_s()  # (cheap first)
            entry.clock.observe(offset)
            entry.times.append(now)
        if changed or seen % CLOCK_MIN_MESSAGES == 0 or now >= self._expires[asset]:
            self._agree(asset, now)

    def offset(self, asset: int) -> float | None:
        """The asset's clock as its sensors agree on it; None where they cannot decide (the
        asset's own StreamClock does)."""
        return self._combined[asset]

    def _live(self, asset: int, now: float) -> dict[int, StreamClock]:
        """The clocks of the sensors live at `now`; those silent long enough are forgotten."""
        clocks, live, expires = self._clocks[asset], {}, math.inf
        for sensor, entry in list(clocks.items()):
            span, age = entry.live_s(), entry.age(now)
            if age <= span:
                live[sensor] = entry.clock
                expires = min(expires, now - age + span)
            elif age > SENSOR_FORGET_SPANS * span:
                del clocks[sensor]
        self._expires[asset] = expires
        return live

    def _decide(
        self, asset: int, live: dict[int, StreamClock]
    ) -> tuple[float | None, dict[int, float]]:
        """(the agreed offset or None, the ready clocks it was agreed from)."""
        if len(live) < 2 or self._singles[asset] * 2 <= len(self._recent[asset]):
            return None, {}
        ready = {s: c.offset for s, c in live.items() if c.ready}
        if len(ready) >= 2:
            return middle(sorted(ready.values())), ready
        # Not yet CLOCK_MIN_MESSAGES each: the middle of what each has sent so far, so one
        # skewed sensor cannot move the asset's clock while the others are still counting.
        return middle(sorted(c.median for c in live.values())), {}

    def _agree(self, asset: int, now: float) -> None:
        combined, ready = self._decide(asset, self._live(asset, now))
        self._combined[asset] = combined
        prefix = f"{self.assets[asset]}/"
        skews = {k: v for k, v in self.skews.items() if not k.startswith(prefix)}
        logged_at = time.monotonic()
        for sensor, offset in ready.items():
            skew = offset - combined  # type: ignore[operator]  # ready: combined is set
            if abs(skew) < SENSOR_SKEW_S:
                continue
            skews[prefix + self.sensors[sensor]] = round(skew, 1)
            if logged_at - self._logged.get((asset, sensor), -CLOCK_LOG_S) >= CLOCK_LOG_S:
                self._logged[(asset, sensor)] = logged_at
                log.warning(
                    "the clock of sensor %s of %s runs %+.0f s from its other sensors' (median "
                    "of its last messages): its readings are judged by the asset's clock and "
                    "dropped (ts_future or late, counted) until the sensor's clock is set",
                    self.sensors[sensor],
                    self.assets[asset],
                    skew,
                )
        self.skews = skews
