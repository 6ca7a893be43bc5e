"""Payload decoding: MQTT message -> readings of one asset, or a counted drop.

Accepted payloads (JSON, UTF-8):

- one reading, sensor from the topic's last level: ``{"ts": 1700000000.5, "value": 3.2}``
  (``"sensor"`` in the object overrides the topic);
- arrays for one sensor (topic's last level): ``{"ts": [t0, t1, ...], "values": [v0, v1, ...]}``;
- arrays for several sensors at shared times: ``{"ts": [...], "values": {"flow": [...], ...}}``;
- a list of readings: ``[{"sensor": "flow", "ts": t, "value": v}, ...]``.

Timestamps are epoch seconds (numbers above 1e11 are taken as milliseconds) or ISO 8601 text
(no zone means UTC). Everything else is dropped and counted by reason; nothing here raises on
input. Decoding runs in the MQTT network thread, so it only decodes and hands rows on.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from paho.mqtt.client import topic_matches_sub

from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest.clocks import CLOCK_MESSAGES as CLOCK_MESSAGES  # re-exported
from edge_agent.ingest.clocks import CLOCK_MIN_MESSAGES as CLOCK_MIN_MESSAGES
from edge_agent.ingest.clocks import SensorClocks, StreamClock
from edge_agent.ingest.rates import MessageRates
from edge_agent.windowing import TimeArray

log = logging.getLogger(__name__)

DROP_REASONS = (
    "oversized",  # payload larger than ingest.max_payload_bytes
    "not_json",  # not UTF-8 JSON
    "bad_shape",  # JSON, but none of the accepted forms (or arrays of unequal length)
    "bad_type",  # a value that is not a number
    "non_finite",  # NaN or infinity
    "out_of_range",  # a value beyond MAX_READING in magnitude (no measurement: a sentinel)
    "bad_timestamp",  # neither a number nor ISO 8601 text, or outside [0, MAX_TIMESTAMP_S)
    "ts_future",  # further ahead of the asset's stream clock than ingest.max_future_s
    "ts_past",  # older than ingest.max_past_s
    "unknown_topic",  # no asset subscribes to it (a broker-side wildcard overlap)
    "unknown_sensor",  # the model has no such sensor for the asset
    "no_model",  # nothing to window for yet: no model installed
    "late",  # older than a grid slot that already closed
    "duplicate",  # same sensor and timestamp again
    "backlog_full",  # the asset had ingest.max_backlog_readings waiting too long (a flood)
    "rate_limited",  # MQTT messages of an asset past ingest.max_messages_per_s (a flood)
)
MS_THRESHOLD = 1e11  # epoch seconds reach 1e11 in the year 5138
# Timestamps a reading may carry, in epoch seconds: from 1970 to 2100. Beyond, a number is no
# clock's; the stream clock followed a hostile 1e22 there and the grid's slot numbers overflowed,
# which stopped the pipeline for every asset.
MAX_TIMESTAMP_S = 4_102_444_800.0  # 2100-01-01T00:00:00Z
# A reading's magnitude limit: beyond it a value is no measurement (a float32 "no data" sentinel
# such as 3.4e38, a hostile 1e39) and overflows the float32 grid: the site's calibration came
# out NaN and the asset could then neither raise nor clear an alert. Counters (a 64-bit
# nanosecond uptime) stay well under it.
MAX_READING = 1e37
# The topic cache holds at most this many topics and this much topic text: a topic may be
# 65,535 bytes long, and 65,536 of those took about 4.4 GB. Longer topics than _CACHED_TOPIC_CHARS
# (no sensor's) are matched each time instead.
_CACHE_LIMIT = 65_536
_CACHE_CHARS = 8 << 20
_CACHED_TOPIC_CHARS = 1_024
_SHOWN_TOPIC_CHARS = 200  # of a topic in a log line
_LOG_EVERY_S = 60.0
_NUMBER = (int, float)
_NUMBER_TYPES = frozenset(_NUMBER)


@dataclass(frozen=True)
class Route:
    """Where a topic's readings go: asset index and the sensor its last level names (or -1)."""

    asset: int
    topic_sensor: int


@dataclass(frozen=True)
class Chunk:
    """Readings of one sensor of one asset: `ts` and `values` are equal-length float arrays."""

    asset: int
    sensor: int
    ts: TimeArray
    values: TimeArray


# A decoded message: a single reading (asset, sensor, ts, value) or chunks.
Single = tuple[int, int, float, float]
Decoded = Single | list[Chunk]


class TopicRoutes:
    """Maps topics to assets and sensor slots of the model schema; cached per topic."""

    def __init__(self, assets: Sequence[AssetConfig], schema: Sequence[str] | None) -> None:
        self.assets = list(assets)
        self.schema = tuple(schema) if schema is not None else None
        index = {name: i for i, name in enumerate(self.schema or ())}
        self._sensor: list[dict[str, int]] = []
        for asset in self.assets:
            names = dict(index)
            for wire, model_name in asset.sensors.items():
                names[wire] = index.get(model_name, -1)
            self._sensor.append(names)
        self._cache: dict[str, Route | None] = {}
        self._cached_chars = 0  # the cache's topic text, bounded by _CACHE_CHARS

    def sensor(self, asset: int, wire_name: str) -> int:
        """The schema slot of a sensor name as it appears on the wire; -1 if unknown."""
        return self._sensor[asset].get(wire_name, -1)

    def route(self, topic: str) -> Route | None:
        cached = self._cache.get(topic, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        found: Route | None = None
        for i, asset in enumerate(self.assets):
            if any(topic_matches_sub(pattern, topic) for pattern in asset.topics):
                found = Route(i, self.sensor(i, topic.rsplit("/", 1)[-1]))
                break
        # A flood of random or long topics must not grow memory; nor may it keep the topics
        # that come after it out: a full cache starts over (a flood of random topics filled
        # it once for good, and a wildcard asset's every message then scanned every pattern).
        chars = len(topic)
        if chars <= _CACHED_TOPIC_CHARS:
            if len(self._cache) >= _CACHE_LIMIT or self._cached_chars + chars > _CACHE_CHARS:
                self._cache.clear()
                self._cached_chars = 0
            self._cache[topic] = found
            self._cached_chars += chars
        return found


class Decoder:
    """Decodes payloads and counts every drop by reason (`drops`, read by the health report)."""

    def __init__(
        self,
        routes: TopicRoutes,
        limits: IngestLimits,
        clock: object = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes
        self.limits = limits
        self.clock = clock  # wall time: readings' timestamps are judged against it
        # Message rates are measured on a clock that never steps (a wall clock set back an
        # hour would stop refilling the buckets for that hour); tests inject one.
        self.monotonic = monotonic
        self.drops: Counter[str] = Counter()
        self.accepted = 0
        self._last_logged: dict[str, float] = {}
        self.clocks: dict[int, StreamClock] = {}  # by asset index
        # ... and by sensor, where a message is one sensor's: the asset's is theirs agreed.
        self.sensor_clocks = SensorClocks([a.name for a in routes.assets], routes.schema or ())
        assets = len(routes.assets)
        self.rates: MessageRates | None = None  # None: no limit
        if limits.max_messages_per_s > 0:
            self.rates = MessageRates(assets, limits.max_messages_per_s, limits.message_burst_s)
        self.rate_limited = [0] * assets  # messages dropped as over the rate, by asset
        self._rate_logged = [-_LOG_EVERY_S] * assets

    def clock_offset(self, asset: int) -> float:
        """Seconds the asset's stream runs ahead of this device's clock (negative: behind)."""
        agreed = self.sensor_clocks.offset(asset)  # None: its sensors cannot decide
        if agreed is not None:
            return agreed
        clock = self.clocks.get(asset)
        return clock.offset if clock is not None else 0.0

    def bounds(self, asset: int, now: float) -> tuple[float, float]:
        """(latest, earliest) timestamps accepted now. The stream clock only ever widens them:
        a stream running ahead is not all "future", a backlog delivered late (an offset
        behind) does not make the live readings after it "future"."""
        offset = self.clock_offset(asset)
        return (
            now + max(0.0, offset) + self.limits.max_future_s,
            now + min(0.0, offset) - self.limits.max_past_s,
        )

    def observe(self, asset: int, ts: float, now: float, sensor: int = -1) -> None:
        """A message's time; `sensor`: the one sensor it carries readings of, if known."""
        clock = self.clocks.get(asset)
        if clock is None:
            clock = self.clocks[asset] = StreamClock()
        clock.observe(ts - now)
        self.sensor_clocks.observe(asset, sensor, ts - now, now)

    def drop(self, reason: str, topic: str, payload: bytes | str, n: int = 1) -> None:
        self.drops[reason] += n
        now = time.monotonic()
        if now - self._last_logged.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[reason] = now
            sample = payload[:120]
            log.warning(
                "dropped input (%s) on %s, e.g. %r; further drops of this kind are counted "
                "in the health report",
                reason,
                shown_topic(topic),
                sample,
            )

    def admit(self, asset: int, topic: str) -> bool:
        """Whether a message of `asset` on `topic` is within ingest.max_messages_per_s; one
        past it is counted (rate_limited) and its caller drops it."""
        rates = self.rates
        if rates is None:
            return True
        now = self.monotonic()
        if rates.admit(asset, now):
            return True
        self._over_rate(asset, topic, now)
        return False

    def _over_rate(self, asset: int, topic: str, now: float) -> None:
        self.drops["rate_limited"] += 1
        self.rate_limited[asset] += 1
        if now - self._rate_logged[asset] >= _LOG_EVERY_S:
            self._rate_logged[asset] = now
            log.warning(
                "asset %s sends more than ingest.max_messages_per_s (%g messages a second, "
                "bursts of %g s); the excess is dropped undecoded and counted (rate_limited, "
                "%d so far), e.g. on %s; logged at most once a minute",
                self.routes.assets[asset].name,
                self.limits.max_messages_per_s,
                self.limits.message_burst_s,
                self.rate_limited[asset],
                shown_topic(topic),
            )

    def decode(self, topic: str, payload: bytes) -> Decoded | None:
        """Readings of one message, or None when all of it was dropped (and counted)."""
        if len(payload) > self.limits.max_payload_bytes:
            self.drop("oversized", topic, payload[:120])
            return None
        route = self.routes.route(topic)
        if route is None:
            self.drop("unknown_topic", topic, payload)
            return None
        if not self.admit(route.asset, topic):  # before any decoding: a flood costs little
            return None
        if self.routes.schema is None:
            self.drop("no_model", topic, payload)
            return None
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.drop("not_json", topic, payload)
            return None
        now = self.clock()  # type: ignore[operator]
        if isinstance(doc, dict):
            if "value" in doc:
                return self._single(topic, payload, route, doc, now)
            if "values" in doc:
                return self._arrays(topic, payload, route, doc, now)
        elif isinstance(doc, list):
            return self._list(topic, payload, route, doc, now)
        self.drop("bad_shape", topic, payload)
        return None

    # ---- forms ----
    def _single(
        self, topic: str, payload: bytes, route: Route, doc: dict[str, object], now: float
    ) -> Single | None:
        sensor = route.topic_sensor
        if "sensor" in doc:
            name = doc["sensor"]
            if not isinstance(name, str):
                self.drop("bad_shape", topic, payload)
                return None
            sensor = self.routes.sensor(route.asset, name)
        judged = self.bounds(route.asset, now)
        reason, ts, value = self._reading(sensor, doc.get("ts"), doc["value"], judged)
        if ts == ts:  # parsed (NaN when not): its offset counts, kept or not
            self.observe(route.asset, ts, now, sensor)
        if reason:
            self.drop(reason, topic, payload)
            return None
        self.accepted += 1
        return (route.asset, sensor, ts, value)

    def _arrays(
        self, topic: str, payload: bytes, route: Route, doc: dict[str, object], now: float
    ) -> list[Chunk] | None:
        raw_ts, raw_values = doc.get("ts"), doc["values"]
        if not isinstance(raw_ts, list) or not raw_ts:
            self.drop("bad_shape", topic, payload)
            return None
        series: list[tuple[int, object]]
        if isinstance(raw_values, list):
            series = [(route.topic_sensor, raw_values)]
        elif isinstance(raw_values, dict) and raw_values:
            series = [
                (self.routes.sensor(route.asset, str(name)), column)
                for name, column in raw_values.items()
            ]
        else:
            self.drop("bad_shape", topic, payload)
            return None
        ts = self._times(raw_ts)
        if ts is None or not (plausible := (ts >= 0.0) & (ts < MAX_TIMESTAMP_S)).any():  # NaN: no
            self.drop("bad_timestamp", topic, payload, len(raw_ts))
            return None
        judged = self.bounds(route.asset, now)
        single = series[0][0] if len(series) == 1 else -1
        if plausible.all():
            self.observe(route.asset, median(ts.tolist()), now, single)
            time_ok = self.time_reasons(ts, judged, topic, payload)
        else:  # the rows with a time no clock gives are counted; the others go on
            self.drop("bad_timestamp", topic, payload, int((~plausible).sum()))
            self.observe(route.asset, median(ts[plausible].tolist()), now, single)
            time_ok = plausible.copy()
            time_ok[plausible] = self.time_reasons(ts[plausible], judged, topic, payload)
        sensors: list[int] = []
        columns: list[list[object]] = []
        for sensor, column in series:
            if not isinstance(column, list) or len(column) != len(raw_ts):
                self.drop("bad_shape", topic, payload)
            elif sensor < 0:
                self.drop("unknown_sensor", topic, payload, len(column))
            elif self._all_numbers(column, topic, payload):
                sensors.append(sensor)
                columns.append(column)
        if not columns:
            return None
        # The whole values block at once: [columns, rows].
        block = np.array(columns, dtype=np.float64)
        finite = np.isfinite(block)
        in_range = np.abs(block) <= MAX_READING  # NaN: False
        keep = time_ok & in_range
        if keep.all():
            self.accepted += block.size
            return [Chunk(route.asset, s, ts, block[i]) for i, s in enumerate(sensors)]
        non_finite = (time_ok & ~finite).sum(axis=1).tolist()
        too_large = (time_ok & finite & ~in_range).sum(axis=1).tolist()
        chunks: list[Chunk] = []
        for i, sensor in enumerate(sensors):
            if non_finite[i]:
                self.drop("non_finite", topic, payload, non_finite[i])
            if too_large[i]:
                self.drop("out_of_range", topic, payload, too_large[i])
            kept = int(keep[i].sum())
            if kept:
                self.accepted += kept
                chunks.append(Chunk(route.asset, sensor, ts[keep[i]], block[i][keep[i]]))
        return chunks or None

    def _list(
        self, topic: str, payload: bytes, route: Route, doc: list[object], now: float
    ) -> list[Chunk] | None:
        if not doc:
            self.drop("bad_shape", topic, payload)
            return None
        by_sensor: dict[int, tuple[list[float], list[float]]] = {}
        judged = self.bounds(route.asset, now)
        parsed: list[float] = []
        for item in doc:
            if not isinstance(item, dict) or "value" not in item:
                self.drop("bad_shape", topic, payload)
                continue
            name = item.get("sensor")
            if name is None:
                sensor = route.topic_sensor
            elif isinstance(name, str):
                sensor = self.routes.sensor(route.asset, name)
            else:
                self.drop("bad_shape", topic, payload)
                continue
            reason, ts, value = self._reading(sensor, item.get("ts"), item["value"], judged)
            if ts == ts:
                parsed.append(ts)
            if reason:
                self.drop(reason, topic, payload)
                continue
            times, values = by_sensor.setdefault(sensor, ([], []))
            times.append(ts)
            values.append(value)
        if parsed:
            self.observe(route.asset, median(parsed), now)
        chunks = [
            Chunk(route.asset, s, np.asarray(t, dtype=np.float64), np.asarray(v, dtype=np.float64))
            for s, (t, v) in by_sensor.items()
        ]
        self.accepted += sum(c.ts.size for c in chunks)
        return chunks or None

    # ---- fields ----
    def _reading(
        self, sensor: int, raw_ts: object, raw_value: object, bounds: tuple[float, float]
    ) -> tuple[str, float, float]:
        """(drop reason or "", timestamp, value); the timestamp is NaN unless it parsed."""
        nan = math.nan
        if sensor < 0:
            return "unknown_sensor", nan, 0.0
        if type(raw_value) not in _NUMBER:  # bool is not a reading
            return "bad_type", nan, 0.0
        value = float(raw_value)  # type: ignore[arg-type]
        reason = value_reason(value)
        if reason:
            return reason, nan, 0.0
        ts = parse_timestamp(raw_ts)
        if ts is None:
            return "bad_timestamp", nan, 0.0
        if ts > bounds[0]:
            return "ts_future", ts, 0.0
        if ts < bounds[1]:
            return "ts_past", ts, 0.0
        return "", ts, value

    def _times(self, raw: list[object]) -> TimeArray | None:
        if all(type(t) in _NUMBER for t in raw):
            ts = np.asarray(raw, dtype=np.float64)
            ms = ts > MS_THRESHOLD
            if ms.any():
                ts = np.where(ms, ts / 1000.0, ts)
        else:
            parsed = [parse_timestamp(t) for t in raw]
            if any(t is None for t in parsed):
                return None
            ts = np.asarray(parsed, dtype=np.float64)
        return ts  # numbers outside `plausible_time` are the caller's to count

    def time_reasons(
        self, ts: TimeArray, bounds: tuple[float, float], topic: str, payload: bytes
    ) -> np.ndarray:
        future = ts > bounds[0]
        past = ts < bounds[1]
        if future.any():
            self.drop("ts_future", topic, payload, int(future.sum()))
        if past.any():
            self.drop("ts_past", topic, payload, int(past.sum()))
        ok: np.ndarray = ~(future | past)
        return ok

    def _all_numbers(self, column: list[object], topic: str, payload: bytes) -> bool:
        """Whether a column holds only numbers; a column with any non-number is dropped whole
        (counted per value), since its positions can no longer be trusted to match the
        timestamps."""
        if set(map(type, column)) <= _NUMBER_TYPES:
            return True
        self.drop("bad_type", topic, payload, len(column))
        return False


def shown_topic(topic: str) -> str:
    """A topic for a log line: quoted, and cut to its first 200 characters and its length
    when longer (a topic may be 65,535 bytes)."""
    if len(topic) <= _SHOWN_TOPIC_CHARS:
        return repr(topic)
    return f"{topic[:_SHOWN_TOPIC_CHARS]!r}... ({len(topic)} characters)"


def median(xs: list[float]) -> float:
    """The median of a few floats (what `np.median` gives, without its cost per call)."""
    ordered = sorted(xs)
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def value_reason(value: float) -> str:
    """Why a reading's value is dropped ("non_finite", "out_of_range"), or "" to keep it."""
    if not math.isfinite(value):
        return "non_finite"
    if abs(value) > MAX_READING:
        return "out_of_range"
    return ""


def plausible_time(ts: float) -> bool:
    """Whether epoch seconds `ts` can be a reading's time (1970 to 2100; NaN: no)."""
    return 0.0 <= ts < MAX_TIMESTAMP_S


def parse_timestamp(raw: object) -> float | None:
    """Epoch seconds from a number (ms above 1e11) or ISO 8601 text; None if neither, or if
    the time is not `plausible_time`."""
    ts: float
    if type(raw) in _NUMBER:
        ts = float(raw)  # type: ignore[arg-type]
        if ts > MS_THRESHOLD:
            ts /= 1000.0
    elif isinstance(raw, str) and 0 < len(raw) <= 40:
        try:
            parsed = dt.datetime.fromisoformat(raw)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        ts = parsed.timestamp()
    else:
        return None
    return ts if plausible_time(ts) else None
