"""One asset's stream in the pipeline thread: closed grid rows -> calibration rows or windows.

It owns the asset's aligner, the ring a window is cut from, the rows collected towards a
calibration, and what follows the asset's clock; `snapshot`/`restore` carry the unscored part
across a graceful restart (`stream_state`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from edge_agent.batching import WindowBatch
from edge_agent.calibration import SiteCalibration, to_network_space
from edge_agent.ingest.stream import ClosedRows, StreamAligner
from edge_agent.serving import ServingModel
from edge_agent.shadow import RowHistory
from edge_agent.windowing import AlignedSeries

log = logging.getLogger(__name__)
MIN_WINDOW_VALID = 0.5  # share of a window's readings that must be present to score it
CLOCK_LOG_FROM_S = 60.0  # and logged (once per CLOCK_LOG_S) from this far
CLOCK_LOG_S = 600.0
# Drains in a row with nothing but readings far behind the closed slots, the least before the
# stream restarts at the new time (`follow_clock` says when).
LATE_STREAK = 8
STEP_LOG_S = 600.0  # stream restarts at a clock step: said at once, then at most this often
# Failed site calibrations in a row double the rows before the next try (from the second
# failure), up to 2**CAL_RETRY_DOUBLINGS times calibration_rows (64 min at 1 Hz and 120 rows).
CAL_RETRY_DOUBLINGS = 5
CAL_LOG_S = 600.0  # a calibration not done: said when its kind changes, else this often


class CalibrationRows:
    """The rows an uncalibrated asset collects towards its site calibration, and when it
    tries: after `rows` rows; after a failure `rows` more, then twice as many after each
    further failure in a row, at most 2**CAL_RETRY_DOUBLINGS times (a dead sensor fails every
    calibration: it was tried, and said, every `rows` rows; a 7-day backlog tried 5,039
    times). A try takes the last `rows` rows. One not started (an earlier one still stuck on
    the inference thread) is no failure: the next comes after as many rows again."""

    def __init__(
        self, name: str, rows: int, sensors: int, period_s: float, clock: Callable[[], float]
    ) -> None:
        self.name, self.rows, self.period_s, self.clock = name, rows, period_s, clock
        self.values = np.zeros((0, sensors), np.float32)  # the last `rows` collected
        self.mask = np.zeros((0, sensors), np.float32)
        self.first_slot = 0  # of the oldest of them
        self.new = 0  # rows collected since the last try
        self.due = rows  # ... before the next
        self.failures = 0  # tries in a row that failed
        self.misses = 0  # ... or were not started
        self._note: tuple[str, bool] | None = None
        self._said_at = -math.inf
        self._said_tried: bool | None = None
        self._unsaid = 0

    @property
    def wanted(self) -> int:
        """Rows still to collect before the next try."""
        return max(0, self.due - self.new)

    def add(self, first_slot: int, values: np.ndarray, mask: np.ndarray) -> None:
        """Rows of consecutive slots `first_slot ...` (rows across a gap are collected as if
        there were none, as before)."""
        count, kept = values.shape[0], self.values.shape[0]
        drop = max(0, kept + count - self.rows)  # the oldest, no longer kept
        self.first_slot = self.first_slot + drop if drop < kept else first_slot + drop - kept
        self.values = last_rows(self.values, values, self.rows)
        self.mask = last_rows(self.mask, mask, self.rows)
        self.new += count

    def restore(self, first_slot: int, values: np.ndarray, mask: np.ndarray) -> None:
        """Those a stopped run had collected, in place of any."""
        self.values, self.mask, self.new = self.values[:0], self.mask[:0], 0
        self.add(first_slot, values, mask)

    def take(self) -> AlignedSeries:
        """The series a try runs on; the rows are taken: a failed try collects new ones."""
        series = AlignedSeries(
            start=self.first_slot * self.period_s,
            period_s=self.period_s,
            values=self.values,
            mask=self.mask,
            row_slot=np.arange(self.values.shape[0], dtype=np.int64),
        )
        self.values, self.mask = self.values[:0], self.mask[:0]
        self.new = 0
        return series

    def not_done(self, why: str, tried: bool) -> None:
        """What the try just taken came to, where it did not calibrate (`start_calibration`
        says; `tried`: False when it was not started)."""
        self._note = (why, tried)

    def ended(self, calibrated: bool) -> None:
        """After a try: calibrated, or when the next comes and, now and then, why not."""
        note, self._note = self._note, None
        if calibrated:
            self.failures = self.misses = 0
            self.due = self.rows
            return
        why, tried = note or ("was not installed", True)
        self.misses += 1
        if tried:
            self.failures += 1
            self.due = self.rows << min(self.failures - 1, CAL_RETRY_DOUBLINGS)
        self._unsaid += 1
        now = self.clock()
        if tried == self._said_tried and now - self._said_at < CAL_LOG_S:
            return
        log.warning(
            "the calibration of %s %s; attempts in a row that did not calibrate it: %d (%d "
            "since the last such line); the next comes after %d more rows (%.0f s of readings)",
            self.name,
            why,
            self.misses,
            self._unsaid,
            self.due,
            self.due * self.period_s,
        )
        self._said_at, self._said_tried, self._unsaid = now, tried, 0


class AssetRunner:
    """One asset in the pipeline thread: aligned rows -> calibration rows or windows."""

    def __init__(
        self,
        index: int,
        name: str,
        model: ServingModel,
        lateness_s: float,
        history_rows: int,
        close_complete: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        spec = model.spec
        self.clock = clock  # this device's time, for how long a stream has been late
        self.index = index
        self.name = name
        self.model = model
        n = model.schema.size
        self.calibration_rows = model.manifest.calibration_rows
        self.aligner = StreamAligner(
            n,
            spec.period_s,
            spec.max_staleness_s,
            lateness_s,
            max_gap_slots=spec.length,
            close_complete=close_complete,
        )
        self.length = spec.length
        # The last `length` rows, oldest first. Never written in place: a window handed on is
        # a view of the arrays these were cut from, so new rows make new arrays.
        self.ring_v = np.zeros((spec.length, n), dtype=np.float32)
        self.ring_m = np.zeros((spec.length, n), dtype=np.float32)
        self.pos = 0  # where the oldest row is: always 0 (kept for the stream state's format)
        self._ring_net: np.ndarray | None = None  # ring_v in network space, normalised once
        self._net_for: SiteCalibration | None = None  # under this calibration
        self.filled = 0
        self.valid_cells = 0.0  # readings present in the ring
        self.sparse_windows = 0  # windows not scored: under MIN_WINDOW_VALID of readings
        self.gaps = 0  # stream restarts after more than a window without readings
        self.clock_logged = -math.inf
        self.late_streak = 0  # drains in a row whose readings were all late
        self.late_since = 0.0  # `clock` at the first of them
        self.added_offset: float | None = None  # the stream clock when readings last came in
        self.seen_readings = 0
        self.seen_late = 0
        self.clock_steps = 0  # stream restarts after the asset's clock stepped back
        self.steps_logged_at = -math.inf
        self.steps_unlogged = 0  # restarts since the last line about them
        self.carried: Counter[str] = Counter()  # counts of aligners replaced by a restart
        self.carried_readings = 0  # and their readings
        # Written by the inference thread when calibration ends; read here.
        self.calibration: SiteCalibration | None = None
        self.cal_rows = CalibrationRows(
            name, self.calibration_rows, n, spec.period_s, lambda: self.clock()
        )
        self.history = RowHistory(history_rows, n)  # for shadow evaluations of a candidate

    def reset_stream(self, aligner: bool = True) -> None:
        """Windows start again from the next rows (and the aligner from the next reading)."""
        self.ring_m = np.zeros_like(self.ring_m)  # not in place: windows may view it
        self.filled = 0
        self.valid_cells = 0.0
        if aligner:
            spec = self.model.spec
            self.carried.update(self.aligner.counts)  # health counts stay cumulative
            self.carried_readings += self.aligner.readings
            self.seen_readings = self.seen_late = self.late_streak = 0
            self.added_offset = None
            self.aligner = StreamAligner(
                self.model.schema.size,
                spec.period_s,
                spec.max_staleness_s,
                self.aligner.lateness,
                self.aligner.max_gap_slots,
                self.aligner.close_complete,
            )

    def snapshot(self) -> dict[str, np.ndarray]:
        """The unscored part of the stream: open slots, the window ring, calibration rows."""
        return {
            **self.aligner.snapshot(),
            "ring_v": self.ring_v,
            "ring_m": self.ring_m,
            "ring": np.array([self.pos, self.filled, self.valid_cells], dtype=np.float64),
            "cal_v": self.cal_rows.values,
            "cal_m": self.cal_rows.mask,
            "cal_first_slot": np.array(self.cal_rows.first_slot, dtype=np.int64),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        if state["ring_v"].shape != self.ring_v.shape:
            raise ValueError(f"a ring of {state['ring_v'].shape}, not {self.ring_v.shape}")
        self.aligner.restore(state)
        pos, filled, valid = state["ring"].tolist()
        order = (int(pos) + np.arange(self.length)) % self.length  # oldest first
        self.ring_v = state["ring_v"][order].astype(np.float32)
        self.ring_m = state["ring_m"][order].astype(np.float32)
        self.pos, self._ring_net = 0, None
        self.filled, self.valid_cells = int(filled), float(valid)
        if self.calibration is None:
            cal_v, cal_m = state["cal_v"], state["cal_m"]
            if cal_v.shape[1:] != self.ring_v.shape[1:] or cal_m.shape != cal_v.shape:
                raise ValueError(f"calibration rows of {cal_v.shape}, {cal_m.shape}")
            first = int(state["cal_first_slot"])
            self.cal_rows.restore(first, cal_v.astype(np.float32), cal_m.astype(np.float32))

    def feed(
        self,
        rows: ClosedRows,
        emit: Callable[[WindowBatch], None],
        start_calibration: Callable[[AssetRunner, AlignedSeries], None],
    ) -> None:
        if rows.gap:  # no reading for longer than a window: windows restart after it
            self.reset_stream(aligner=False)
            self.gaps += 1
        self.history.extend(rows.first_slot, rows.values, rows.mask)
        values, mask, first = rows.values, rows.mask, rows.first_slot
        cal_rows = self.cal_rows
        while self.calibration is None and values.shape[0]:
            take = min(values.shape[0], cal_rows.wanted)
            if take:
                self._collect(first, values[:take], mask[:take])
                values, mask, first = values[take:], mask[take:], first + take
            if not cal_rows.wanted:
                start_calibration(self, cal_rows.take())
                cal_rows.ended(self.calibration is not None)
        if values.shape[0]:
            self._cut(first, values, mask, emit)

    def calibration_not_done(self, why: str, tried: bool) -> None:
        """From `start_calibration`, on this thread: why the calibration it was handed did
        not calibrate the asset (`tried`: False when it was not started)."""
        self.cal_rows.not_done(why, tried)

    def _collect(self, first: int, values: np.ndarray, mask: np.ndarray) -> None:
        """Rows before the site is calibrated: into the ring and the calibration rows."""
        self.ring_v = last_rows(self.ring_v, values, self.length)
        self.ring_m = last_rows(self.ring_m, mask, self.length)
        self.valid_cells = float(self.ring_m.sum(dtype=np.float64))
        self._ring_net = None
        self.filled += values.shape[0]
        self.cal_rows.add(first, values, mask)

    def _cut(
        self, first: int, values: np.ndarray, mask: np.ndarray, emit: Callable[[WindowBatch], None]
    ) -> None:
        """The windows ending at rows `first ...` (every `stride`-th slot once the ring is
        full), handed on together: the ring's last rows and the new ones in one new array,
        each row normalised once (the ring's rows when they came, or once after a new
        calibration), the windows one sliding view of it."""
        cal = self.calibration
        assert cal is not None
        spec, frame = self.model.spec, self.model.frame
        length, count = self.length, values.shape[0]
        tail_net = self._ring_net
        if tail_net is None or self._net_for is not cal:
            tail_net = to_network_space(
                self.ring_v, cal.input_center, cal.input_scale, frame.net_center, frame.net_scale
            )
        new_net = to_network_space(
            values, cal.input_center, cal.input_scale, frame.net_center, frame.net_scale
        )
        hist_v = np.concatenate([self.ring_v[1:], values])  # [length - 1 + count, N]
        hist_m = np.concatenate([self.ring_m[1:], mask])
        net = np.concatenate([tail_net[1:], new_net])
        # Window k covers hist rows k ... k + length - 1 and ends at slot first + k. Cell
        # counts are whole numbers: summed in any order they are exact.
        total = np.empty(hist_m.shape[0] + 1, dtype=np.float64)
        total[0] = 0.0
        np.cumsum(hist_m.sum(axis=1, dtype=np.float64), out=total[1:])
        valid = total[length:] - total[:count]  # [count]
        stride = spec.stride
        due = max(0, length - 1 - self.filled)  # the first row whose window is full
        k0 = due + (-(first + due)) % stride  # the first of those on the stride
        if k0 < count:
            # Mostly missing: sparse readings spread over a long time (one message with
            # readings hours apart) would otherwise score a window for every slot between.
            dense = valid[k0::stride] >= MIN_WINDOW_VALID * self.ring_m.size
            kept = int(np.count_nonzero(dense))
            self.sparse_windows += dense.size - kept
            if kept:
                self._emit(first, k0, dense, hist_v, hist_m, net, emit)
        self.ring_v, self.ring_m = hist_v[-length:], hist_m[-length:]
        self._ring_net, self._net_for = net[-length:], cal
        self.filled += count
        self.valid_cells = float(total[-1] - total[-1 - length])

    def _emit(
        self,
        first: int,
        k0: int,
        dense: np.ndarray,
        hist_v: np.ndarray,
        hist_m: np.ndarray,
        net: np.ndarray,
        emit: Callable[[WindowBatch], None],
    ) -> None:
        """The windows k0, k0 + stride, ... that are `dense`, as one batch of views (copies
        only where sparse windows are left out between them)."""
        stride, length = self.model.spec.stride, self.length
        picks: slice | np.ndarray = slice(k0, k0 + stride * dense.size, stride)
        ks: Sequence[int] = range(k0, k0 + stride * dense.size, stride)
        if not dense.all():
            picks = np.flatnonzero(dense) * stride + k0
            ks = picks.tolist()

        def windows(rows: np.ndarray) -> np.ndarray:
            return sliding(rows, length)[picks]

        emit(
            WindowBatch(
                self.index,
                windows(net),
                windows(hist_m),
                windows(hist_v),
                [first + k for k in ks],
                self.model.spec.period_s,
            )
        )

    def follow_clock(self, offset: float) -> None:
        """After each drain: restarts the stream where the asset's clock stepped back, and says
        a stream clock `offset` s away from this device's (once per CLOCK_LOG_S; in health,
        `clock_offset_s`).

        A drain that added nothing and whose readings landed far behind the slots already
        closed (`late_far`) is late. At least LATE_STREAK late drains in a row restart the
        stream at the new time (instead of dropping everything as late until the clock
        catches up) once this device's time (`clock`) and the stream's say the asset's time
        went back, not one sensor's:
        - its stream clock (`offset`, the decoder's median, the middle of its sensors' where
          they send apart) is more than `late_far` behind what it was when readings last
          came in, and none came in for LATE_STREAK periods: the whole asset stepped back
          (a gateway rebooted to an old time);
        - or none came in for longer than a window while late ones kept coming (a stream
          stamped by this device, whose clock stepped back, moves no offset); a window
          without readings cannot be scored anyway.
        One sensor whose clock runs behind sends late readings only: the others still add
        theirs every period or so, and the stream clock stays where they agree (where an
        estimate of it sways with that sensor's messages, the periods still hold). Counting
        drains alone, a fast one (10 messages between the others') restarted the stream
        every second."""
        aligner = self.aligner
        added, late = aligner.readings, aligner.counts["late_far"]
        now = self.clock()
        if added != self.seen_readings or self.added_offset is None:
            self.added_offset = offset
        if added == self.seen_readings and late > self.seen_late:
            if not self.late_streak:
                self.late_since = now
            self.late_streak += 1
        else:
            self.late_streak = 0
        self.seen_readings, self.seen_late = added, late
        if self.late_streak >= LATE_STREAK:
            back = self.added_offset - offset
            silent = now - self.late_since
            period = aligner.period
            if (back > aligner.far_s and silent >= LATE_STREAK * period) or (
                silent > aligner.max_gap_slots * period
            ):
                self._clock_stepped(back, silent, now)
        if abs(offset) >= CLOCK_LOG_FROM_S and now - self.clock_logged >= CLOCK_LOG_S:
            self.clock_logged = now
            log.warning(
                "the readings of %s run %+.0f s from this device's clock (median of its last "
                "messages); they are judged against their own clock: set the sensor's or "
                "this device's clock (NTP)",
                self.name,
                offset,
            )

    def _clock_stepped(self, back: float, silent: float, now: float) -> None:
        """The stream restarts at the new time; said at once, then once per STEP_LOG_S."""
        streak = self.late_streak
        self.reset_stream()
        self.clock_steps += 1
        self.steps_unlogged += 1
        if now - self.steps_logged_at < STEP_LOG_S:
            return
        log.warning(
            "every reading of %s in its last %d messages fell behind the slots already "
            "closed, and %s: its clock stepped back; its stream restarts at the new time "
            "(%d restart(s) since the last such line, %d in all)",
            self.name,
            streak,
            f"its stream clock went back {back:.0f} s"
            if back > self.aligner.far_s
            else f"none of its sensors added a reading for {silent:.0f} s",
            self.steps_unlogged,
            self.clock_steps,
        )
        self.steps_logged_at, self.steps_unlogged = now, 0


def last_rows(kept: np.ndarray, new: np.ndarray, count: int) -> np.ndarray:
    """The last `count` rows of `kept` then `new`, as a new C-contiguous array (never a view
    of either: windows handed on may view the old one, and `new` may be a large block)."""
    if new.shape[0] >= count:
        return new[new.shape[0] - count :].copy()
    return np.concatenate([kept[max(0, kept.shape[0] + new.shape[0] - count) :], new])


def sliding(rows: np.ndarray, length: int) -> np.ndarray:
    """[R - length + 1, length, N]: every `length` consecutive rows of a C-contiguous [R, N]
    array, as one read-only view (what numpy's `sliding_window_view` gives with its window
    axis moved, without its ~30 us of checks per call, which a small batch would feel)."""
    assert rows.flags.c_contiguous
    step, cell = rows.strides
    shape = (rows.shape[0] - length + 1, length, rows.shape[1])
    view: np.ndarray = np.ndarray(shape, rows.dtype, rows, 0, (step, step, cell))
    view.flags.writeable = False
    return view
