"""Streaming alignment: readings in any order -> closed grid rows, the way `align_to_grid` does
it offline.

Slot g of the grid sits at time g * period (an absolute grid, the same on every restart). A
slot's value per sensor is the latest reading at or before its time, valid (mask 1) when at
most `max_staleness_s` old. A slot closes once the newest reading of the asset is
`lateness_s` past it, or sooner, as soon as it is complete: every sensor has a reading past
it, or is not due to send one before it (its newest reading plus `STEP_SHARE` of its
shortest recent interval, at most the staleness bound, lies past the slot). A complete slot
cannot change unless a sensor's readings arrive out of order or much faster than before; a
sensor seen out of order does not close slots early again until `TRUST_AFTER_READINGS` of
its readings came in order, nor does one stamped ahead of this device's clock. A reading that
would change a closed slot is late, and dropped. After more than `max_gap_slots` slots
without any reading the stream skips to the next reading
(`ClosedRows.gap`): a message of sparse readings costs one row per reading, not a window of
empty rows each.
Out-of-order readings within the lateness are sorted in; a repeated (sensor, timestamp)
keeps the first value.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from bisect import bisect_right
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from edge_agent.windowing import FloatArray, TimeArray

EPS = 1e-9
VECTOR_ROWS = 16  # rows closed at once from which numpy per sensor beats a loop per row
TRUST_AFTER_READINGS = 100  # in-order readings before a sensor seen out of order closes slots
STEP_SHARE = 0.9  # of a sensor's shortest recent interval: how soon its next reading can come
STEPS = 8  # recent intervals kept per sensor
MIN_STEPS = 3  # known before they are trusted to close a slot ahead of a sensor's reading


@dataclass(frozen=True)
class ClosedRows:
    """Rows of consecutive slots `first_slot ...`; `gap` when slots were skipped before them."""

    first_slot: int
    values: FloatArray  # [K, N]
    mask: FloatArray  # [K, N]
    gap: bool


def _order(times: list[float]) -> tuple[bool, bool]:
    """Whether `times` is increasing, and whether non-decreasing."""
    increasing = all(map(operator.lt, times, times[1:]))
    return increasing, increasing or all(map(operator.le, times, times[1:]))


class StreamAligner:
    """One asset's pending readings and grid position. Not thread-safe: one thread feeds it."""

    def __init__(
        self,
        sensors: int,
        period_s: float,
        max_staleness_s: float,
        lateness_s: float,
        max_gap_slots: int,
        close_complete: bool = True,
    ) -> None:
        self.n = sensors
        self.close_complete = close_complete
        self.period = period_s
        self.staleness = max_staleness_s
        self.lateness = lateness_s
        self.max_gap_slots = max(1, max_gap_slots)
        # Late by more than this (a window, at least 5 minutes): not a resent or slightly
        # delayed reading, but a clock behind the stream's (`late_far`).
        self.far_s = max(self.max_gap_slots * period_s, 300.0)
        self._t: list[list[float]] = [[] for _ in range(sensors)]
        self._v: list[list[float]] = [[] for _ in range(sensors)]
        self._unsorted = [False] * sensors
        self._last_t = [-math.inf] * sensors
        self._last_v = [0.0] * sensors
        self._newest = [-math.inf] * sensors  # each sensor's newest reading
        self._distrust = [0] * sensors  # in-order readings until it closes slots early again
        self._steps: list[deque[float]] = [deque(maxlen=STEPS) for _ in range(sensors)]
        self._step = [0.0] * sensors  # shortest recent interval between a sensor's readings
        self.next_slot: int | None = None  # first slot not closed yet
        self.watermark = -math.inf
        self.counts: Counter[str] = Counter()
        self.readings = 0

    def _closed_time(self) -> float:
        return -math.inf if self.next_slot is None else (self.next_slot - 1) * self.period

    def add(self, sensor: int, ts: float, value: float) -> None:
        newest = self._newest[sensor]
        if ts > newest:
            self._newest[sensor] = ts
            if newest > -math.inf:
                self._stepped(sensor, [ts - newest])
            if self._distrust[sensor]:
                self._distrust[sensor] -= 1
        elif ts < newest:
            self._distrust[sensor] = TRUST_AFTER_READINGS
        closed = self._closed_time()
        if ts <= closed + EPS:
            self.counts["duplicate" if ts == self._last_t[sensor] else "late"] += 1
            if ts < closed - self.far_s:
                self.counts["late_far"] += 1
            return
        times = self._t[sensor]
        if times:
            last = times[-1]
            if ts == last:
                self.counts["duplicate"] += 1
                return
            if ts < last:
                self._unsorted[sensor] = True
                self.counts["out_of_order"] += 1
        times.append(ts)
        self._v[sensor].append(value)
        self.readings += 1
        if ts > self.watermark:
            self.watermark = ts

    def add_many(self, sensor: int, ts: TimeArray, values: TimeArray) -> None:
        """A sensor's readings of one message. In plain floats: a message holds tens of
        readings, where numpy costs more per call than a loop costs over all of them."""
        times_in = ts.tolist()
        if times_in:
            self._add_list(sensor, times_in, values.tolist(), _order(times_in))

    def add_block(self, sensors: list[int], ts: TimeArray, columns: list[TimeArray]) -> None:
        """Readings of several sensors at the same times (one column each): what `add_many`
        does for each, the times converted and checked once."""
        times_in = ts.tolist()
        if times_in:
            order = _order(times_in)
            for sensor, column in zip(sensors, columns, strict=True):
                self._add_list(sensor, times_in, column.tolist(), order)

    def _add_list(
        self,
        sensor: int,
        times_in: list[float],
        values_in: list[float],
        order: tuple[bool, bool],
    ) -> None:
        """`add_many` on lists; `order`: whether `times_in` is increasing, non-decreasing."""
        newest = self._newest[sensor]
        increasing, ascending = order
        if times_in[0] < newest or not ascending:
            self._distrust[sensor] = TRUST_AFTER_READINGS
            top = max(times_in)
        else:
            self._distrust[sensor] = max(0, self._distrust[sensor] - len(times_in))
            recent = [newest, *times_in[-STEPS:]]
            steps = [b - a for a, b in itertools.pairwise(recent)]
            self._stepped(sensor, [d for d in steps if math.isfinite(d)])
            top = times_in[-1]
        self._newest[sensor] = max(newest, top)
        closed = self._closed_time()
        bound = closed + EPS
        if min(times_in) <= bound:
            late = [t <= bound for t in times_in]
            self.counts["late"] += sum(late)
            self.counts["late_far"] += sum(t < closed - self.far_s for t in times_in)
            values_in = [v for v, gone in zip(values_in, late, strict=True) if not gone]
            times_in = [t for t, gone in zip(times_in, late, strict=True) if not gone]
            if not times_in:
                return
            increasing = all(map(operator.lt, times_in, times_in[1:]))
        times = self._t[sensor]
        if (times and times_in[0] <= times[-1]) or not increasing:
            self._unsorted[sensor] = True  # sorted and de-duplicated when the slot closes
        times.extend(times_in)
        self._v[sensor].extend(values_in)
        self.readings += len(times_in)
        top = max(times_in) if not increasing else times_in[-1]
        if top > self.watermark:
            self.watermark = top

    def close_ready(self, now: float | None = None) -> ClosedRows | None:
        """Closes the slots the watermark has passed by the lateness, up to the next gap;
        None if none. Call until None.

        `now` (this device's clock) caps the watermark: a reading stamped ahead of it waits
        until its time instead of closing slots early, so one outlier cannot make the
        asset's valid readings "late" (readings further ahead than `ingest.max_future_s` are
        dropped before they get here)."""
        if self.watermark == -math.inf:
            return None
        horizon = self.watermark if now is None else min(self.watermark, now)
        last = math.floor((horizon - self.lateness) / self.period + EPS)
        if self.close_complete:
            # Past a sensor's newest reading by at most its staleness (or a period): further on
            # there is nothing to close early, and a long silence must stay a gap.
            reach = max(self.period, self.staleness)
            complete = math.inf  # called once per message: a loop, not min() over a generator
            for t, step, distrust in zip(self._newest, self._step, self._distrust, strict=True):
                if distrust or (now is not None and t > now):
                    complete = -math.inf
                    break
                ahead = t + min(STEP_SHARE * step, reach)
                if ahead < complete:
                    complete = ahead
            if complete > -math.inf:
                last = max(last, math.floor(complete / self.period + EPS))
        if self.next_slot is None:
            for j in range(self.n):
                if self._unsorted[j]:
                    self._sort(j)
            earliest = min((t[0] for t in self._t if t), default=self.watermark)
            self.next_slot = math.ceil(earliest / self.period - EPS)
        if last < self.next_slot:
            return None
        for j in range(self.n):
            if self._unsorted[j]:
                self._sort(j)
        # A gap is a stretch with no readings at all, not a long backlog: a burst of queued
        # readings (a broker delivering after a reconnect) is aligned row by row.
        gap = False
        grid = self.next_slot * self.period + EPS
        after = [t[k] for t in self._t if (k := bisect_right(t, grid)) < len(t)]
        pending = min(after, default=self.watermark)  # first reading past the next slot
        first_data = math.ceil(pending / self.period - EPS)
        if first_data - self.next_slot > self.max_gap_slots:
            # Longer than a window without any reading: the stream restarts at the next
            # reading (the caller restarts its windows), nothing is scored across the gap.
            skip_to = min(first_data, last + 1)
            self.counts["gap_slots"] += skip_to - self.next_slot
            self._consume_until((skip_to - 1) * self.period)
            self.next_slot = skip_to
            gap = True
        # A gap further on ends these rows at the last reading before it; the next call
        # skips the gap (callers close until None).
        start = self.next_slot * self.period + EPS
        limit = last * self.period + EPS
        if last - self.next_slot + 1 >= VECTOR_ROWS:  # a backlog or a batch: numpy per sensor
            last = self._before_gap(start, limit, last)
            values, mask = self._rows_at_once(last)
        else:
            last = self._before_gap_lazily(start, limit, last)
            values, mask = self._rows_one_by_one(last)
        rows = ClosedRows(self.next_slot, values, mask, gap)
        self.next_slot = last + 1
        return rows

    def _before_gap_lazily(self, start: float, limit: float, last: int) -> int:
        """`last`, or the last slot before the first gap after `start`. The readings in time
        order, merged lazily: the scan stops at the first gap or past the rows being closed,
        so a backlog costs what it closes, not what is pending."""
        gap_s = self.max_gap_slots * self.period
        before = -math.inf
        for t in heapq.merge(*self._t):
            if before > start and t - before > gap_s:
                return min(last, math.floor(before / self.period + EPS))
            if t > limit:
                break
            before = t
        return last

    def _before_gap(self, start: float, limit: float, last: int) -> int:
        """As `_before_gap_lazily`, in numpy: every sensor's readings up to `limit` and its
        next one, sorted together; the first jump longer than a gap after `start`."""
        heads: list[float] = []
        for t in self._t:
            heads += t[: bisect_right(t, limit) + 1]
        if not heads:
            return last
        merged = np.sort(np.array(heads, dtype=np.float64))
        pairs = min(int(np.searchsorted(merged, limit, side="right")), merged.size - 1)
        prev, nxt = merged[:pairs], merged[1 : pairs + 1]
        jumps = np.flatnonzero((prev > start) & (nxt - prev > self.max_gap_slots * self.period))
        if jumps.size:
            return min(last, math.floor(float(prev[jumps[0]]) / self.period + EPS))
        return last

    def _rows_one_by_one(self, last: int) -> tuple[FloatArray, FloatArray]:
        assert self.next_slot is not None
        values: list[float] = []
        mask: list[bool] = []
        bound = self.staleness + EPS
        for slot in range(self.next_slot, last + 1):
            grid = slot * self.period
            self._consume_until(grid)
            values += self._last_v
            mask += [grid - t <= bound for t in self._last_t]
        shape = (last - self.next_slot + 1, self.n)
        return (
            np.array(values, dtype=np.float32).reshape(shape),
            np.array(mask, dtype=np.float32).reshape(shape),
        )

    def _rows_at_once(self, last: int) -> tuple[FloatArray, FloatArray]:
        """Slots `next_slot ... last`, one search per sensor (as `align_to_grid` does), in
        one array of every sensor's consumed readings, each led by its last reading before
        them (older than every slot here), so every slot finds one."""
        assert self.next_slot is not None
        grid = np.arange(self.next_slot, last + 1, dtype=np.float64) * self.period
        top = float(grid[-1]) + EPS
        flat_t: list[float] = []
        flat_v: list[float] = []
        starts = [0]
        for j in range(self.n):
            times, values = self._t[j], self._v[j]
            k = bisect_right(times, top)  # the readings these slots consume
            flat_t.append(self._last_t[j])
            flat_t += times[:k]
            flat_v.append(self._last_v[j])
            flat_v += values[:k]
            starts.append(len(flat_t))
            if k:
                self._last_t[j], self._last_v[j] = times[k - 1], values[k - 1]
                del times[:k]
                del values[:k]
        t = np.array(flat_t, dtype=np.float64)
        probe = grid + EPS
        at = np.empty((grid.size, self.n), dtype=np.intp)
        for j in range(self.n):
            a, b = starts[j], starts[j + 1]
            at[:, j] = np.searchsorted(t[a:b], probe, side="right") + (a - 1)
        values_out = np.array(flat_v, dtype=np.float64)[at].astype(np.float32)
        mask = (grid[:, None] - t[at] <= self.staleness + EPS).astype(np.float32)
        return values_out, mask

    def _stepped(self, sensor: int, steps: list[float]) -> None:
        """Keeps a sensor's recent sampling intervals. Longer than the staleness bound is a
        silence (a restart, an outage), not an interval; with fewer than `MIN_STEPS` known,
        the sensor closes no slot past its newest reading."""
        kept = self._steps[sensor]
        reach = max(self.period, self.staleness)
        kept.extend(step for step in steps if step <= reach)
        self._step[sensor] = min(kept) if len(kept) >= MIN_STEPS else 0.0

    def trim(self, limit: int) -> int:
        """Keeps at most `limit` slots' worth of readings waiting per sensor. A slot takes the
        last reading at or before its time, so of the readings in one slot's interval only the
        last can ever be used: the others go first, losing nothing (a sensor sampled faster
        than the grid), with repeated timestamps; past `limit` slots the newest go (readings
        stamped ahead wait for their time, and a flood of them must not hold memory, or make
        each close re-sort it, without bound). Returns how many of those went (counted
        `backlog_full`)."""
        dropped = 0
        for j in range(self.n):
            if len(self._t[j]) <= limit:
                continue
            if self._unsorted[j]:
                self._sort(j)  # counts the repeated timestamps
            times, values = self._t[j], self._v[j]
            slot = np.ceil((np.asarray(times) - EPS) / self.period)  # the slot each one is for
            last = np.flatnonzero(np.append(slot[1:] != slot[:-1], True))
            if last.size < len(times):
                times = self._t[j] = [times[k] for k in last.tolist()]
                values = self._v[j] = [values[k] for k in last.tolist()]
            extra = len(times) - limit
            if extra > 0:
                del times[limit:], values[limit:]
                dropped += extra
                self._newest[j] = times[-1]
        if dropped:
            self.counts["backlog_full"] += dropped
            kept = [times[-1] for times in self._t if times]
            self.watermark = max([self._closed_time(), *kept])
        return dropped

    @property
    def pending_readings(self) -> int:
        return sum(len(times) for times in self._t)

    def snapshot(self) -> dict[str, np.ndarray]:
        """The open slots and grid position, for `restore` after a restart."""
        for j in range(self.n):
            if self._unsorted[j]:
                self._sort(j)
        return {
            "pending_t": np.array([t for times in self._t for t in times], dtype=np.float64),
            "pending_v": np.array([v for values in self._v for v in values], dtype=np.float64),
            "pending_n": np.array([len(times) for times in self._t], dtype=np.int64),
            "last_t": np.array(self._last_t, dtype=np.float64),
            "last_v": np.array(self._last_v, dtype=np.float64),
            "grid": np.array(
                [-1 if self.next_slot is None else self.next_slot, self.watermark], dtype=np.float64
            ),
            "newest": np.array(self._newest, dtype=np.float64),
            "distrust": np.array(self._distrust, dtype=np.int64),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        counts = state["pending_n"]
        if counts.shape != (self.n,):
            raise ValueError(f"stream state for {counts.shape[0]} sensors, not {self.n}")
        edges = np.concatenate([[0], np.cumsum(counts)])
        self._t = [state["pending_t"][a:b].tolist() for a, b in itertools.pairwise(edges)]
        self._v = [state["pending_v"][a:b].tolist() for a, b in itertools.pairwise(edges)]
        self._unsorted = [False] * self.n
        self._last_t = state["last_t"].tolist()
        self._last_v = state["last_v"].tolist()
        next_slot, watermark = state["grid"].tolist()
        self.next_slot = None if next_slot < 0 else int(next_slot)
        self.watermark = float(watermark)
        if "newest" in state:  # absent in a state kept before slots closed early
            self._newest = state["newest"].tolist()
            self._distrust = state["distrust"].tolist()

    def _consume_until(self, grid: float) -> None:
        limit = grid + EPS
        for j in range(self.n):
            times = self._t[j]
            if times and times[0] <= limit:
                k = bisect_right(times, limit)
                self._last_t[j] = times[k - 1]
                self._last_v[j] = self._v[j][k - 1]
                del times[:k]
                del self._v[j][:k]

    def _sort(self, j: int) -> None:
        pairs = sorted(zip(self._t[j], self._v[j], strict=True), key=lambda p: p[0])
        times: list[float] = []
        values: list[float] = []
        for t, v in pairs:  # stable sort: the first of equal timestamps was received first
            if times and t == times[-1]:
                self.counts["duplicate"] += 1
                continue
            times.append(t)
            values.append(v)
        self._t[j], self._v[j] = times, values
        self._unsorted[j] = False
