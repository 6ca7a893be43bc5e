"""The vectorised ingest path gives exactly what the plain one gives: windows cut from a ring
against windows cut from the whole history, rows closed per sensor at once against rows closed
one by one, a message's readings added in plain floats against the numpy version they replace,
and a values block validated at once against column by column."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_agent.asset_stream import MIN_WINDOW_VALID, AssetRunner
from edge_agent.batching import WindowBatch, WindowJob
from edge_agent.calibration import SiteCalibration, to_network_space
from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest import stream
from edge_agent.ingest.decode import (
    CLOCK_MESSAGES,
    CLOCK_MIN_MESSAGES,
    Chunk,
    Decoder,
    Route,
    StreamClock,
    TopicRoutes,
)
from edge_agent.ingest.fair_queue import FairQueue
from edge_agent.ingest.stream import EPS, STEPS, TRUST_AFTER_READINGS, ClosedRows, StreamAligner
from edge_agent.windowing import AlignedSeries, WindowSpec

pytestmark = pytest.mark.unit
N, LENGTH = 3, 6


def _calibration(seed: int) -> SiteCalibration:
    rng = np.random.default_rng(seed)
    return SiteCalibration(
        input_center=rng.normal(size=N).astype(np.float32),
        input_scale=rng.uniform(0.5, 2.0, N).astype(np.float32),
        residual_scale=np.ones(N, dtype=np.float32),
        rows=4,
    )


def _runner(stride: int) -> AssetRunner:
    """An asset runner over a stand-in model: only its shapes and frame are read here."""
    model: Any = SimpleNamespace(
        spec=WindowSpec(LENGTH, stride, 1.0, 2.0),
        schema=SimpleNamespace(size=N),
        manifest=SimpleNamespace(calibration_rows=4),
        frame=SimpleNamespace(
            net_center=np.array([0.5, -1.0, 2.0], np.float32),
            net_scale=np.array([1.5, 0.25, 3.0], np.float32),
        ),
    )
    return AssetRunner(0, "pump-1", model, lateness_s=2.0, history_rows=0)


@pytest.mark.parametrize("stride", [1, 3])
def test_windows_cut_from_the_ring_are_those_of_the_whole_history(stride: int) -> None:
    """Random batches of rows (gaps, sparse stretches, a new calibration, a restart from the
    kept state in the old ring layout) give the windows, masks and times cut from the whole
    history, and the same sparse count."""
    rng = np.random.default_rng(stride)
    runner = _runner(stride)
    cals = [_calibration(1), _calibration(2)]
    frame = runner.model.frame
    got: list[WindowJob] = []

    def emit(batch: WindowBatch) -> None:
        got.extend(batch.jobs())

    expected: list[tuple[float, float, np.ndarray, np.ndarray, np.ndarray]] = []
    rows_v: list[np.ndarray] = []  # since the last gap
    rows_m: list[np.ndarray] = []
    sparse = carried = 0
    total = 0  # rows fed: the first 4 go to the calibration

    def calibrate(r: AssetRunner, series: AlignedSeries) -> None:
        r.calibration = cals[0]

    slot = 100
    for step in range(300):
        if step == 150:  # a graceful restart, its ring kept with the oldest row at 4
            state = runner.snapshot()
            state["ring_v"] = np.roll(state["ring_v"], 4, axis=0)
            state["ring_m"] = np.roll(state["ring_m"], 4, axis=0)
            state["ring"][0] = 4
            calibration = runner.calibration
            carried = runner.sparse_windows
            runner = _runner(stride)
            runner.calibration = calibration
            runner.restore(state)
        if step == 200:
            runner.calibration = cals[1]  # a new calibration: the ring is normalised again
        gap = rng.random() < 0.05
        if gap:
            slot += LENGTH + int(rng.integers(1, 10))
            rows_v, rows_m = [], []
        count = int(rng.choice([1, 1, 2, 5, 17, 40]))
        values = rng.normal(size=(count, N)).astype(np.float32)
        mask = (rng.random((count, N)) < rng.choice([0.2, 0.9])).astype(np.float32)
        runner.feed(ClosedRows(slot, values, mask, gap), emit, calibrate)
        for k in range(count):
            rows_v.append(values[k])
            rows_m.append(mask[k])
            end = slot + k
            total += 1
            if total <= 4 or len(rows_v) < LENGTH or end % stride:
                continue
            window_v = np.stack(rows_v[-LENGTH:])
            window_m = np.stack(rows_m[-LENGTH:])
            if window_m.sum() < MIN_WINDOW_VALID * LENGTH * N:
                sparse += 1
                continue
            cal = runner.calibration
            assert cal is not None
            net = to_network_space(
                window_v, cal.input_center, cal.input_scale, frame.net_center, frame.net_scale
            )
            start = float(end - LENGTH + 1)
            expected.append((start, float(end), net, window_m, window_v))
        slot += count
    assert carried + runner.sparse_windows == sparse > 0
    assert len(got) == len(expected) > 200
    for job, (start, end, net, mask, raw) in zip(got, expected, strict=True):
        assert (job.window_start, job.window_end) == (start, end)
        np.testing.assert_array_equal(job.window, net)
        np.testing.assert_array_equal(job.mask, mask)
        assert job.raw is not None
        np.testing.assert_array_equal(job.raw, raw)
    assert runner.valid_cells == float(np.stack(rows_m[-LENGTH:]).sum())


def _readings(seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Messages of one sensor each: in order and out of order, duplicates, late ones, gaps,
    sensors that go quiet."""
    rng = np.random.default_rng(seed)
    out = []
    t = 1_700_000_000.0
    for _ in range(400):
        t += float(rng.choice([0.0, 0.5, 1.0, 1.0, 3.0, 40.0]))
        sensor = int(rng.integers(0, N if rng.random() < 0.8 else 1))
        size = int(rng.choice([1, 1, 3, 24]))
        ts = t + np.sort(rng.uniform(-4.0, 2.0, size)).round(1)
        if rng.random() < 0.2:
            ts = rng.permutation(ts)
        if rng.random() < 0.1 and size > 1:
            ts[1] = ts[0]  # a duplicate inside the message
        out.append((sensor, ts, rng.normal(size=size)))
    return out


def _numpy_add_many(self: StreamAligner, sensor: int, ts: np.ndarray, values: np.ndarray) -> None:
    """`StreamAligner.add_many` as it was, in numpy: the reference."""
    if ts.size:
        newest = self._newest[sensor]
        if ts[0] < newest or (ts.size > 1 and bool((np.diff(ts) < 0).any())):
            self._distrust[sensor] = TRUST_AFTER_READINGS
        else:
            self._distrust[sensor] = max(0, self._distrust[sensor] - int(ts.size))
            steps = np.diff(np.concatenate([[newest], ts[-STEPS:]]))
            self._stepped(sensor, steps[np.isfinite(steps)].tolist())
        self._newest[sensor] = max(newest, float(ts.max()))
    closed = self._closed_time()
    late = ts <= closed + EPS
    if late.any():
        self.counts["late"] += int(late.sum())
        self.counts["late_far"] += int((ts < closed - self.far_s).sum())
        ts, values = ts[~late], values[~late]
    if ts.size == 0:
        return
    times = self._t[sensor]
    if (times and ts[0] <= times[-1]) or (ts.size > 1 and bool((np.diff(ts) <= 0).any())):
        self._unsorted[sensor] = True
    times.extend(ts.tolist())
    self._v[sensor].extend(values.tolist())
    self.readings += int(ts.size)
    top = float(ts.max())
    if top > self.watermark:
        self.watermark = top


def _run(
    aligner: StreamAligner, seed: int, add: Any
) -> tuple[list[tuple[int, bool]], np.ndarray, np.ndarray, dict[str, int], dict[str, Any]]:
    heads: list[tuple[int, bool]] = []
    values, masks = [], []
    for sensor, ts, v in _readings(seed):
        add(aligner, sensor, ts, v)
        now = float(ts.max()) + 0.5
        while (rows := aligner.close_ready(now)) is not None:
            heads.append((rows.first_slot, rows.gap))
            values.append(rows.values)
            masks.append(rows.mask)
    state = {k: v.tolist() for k, v in aligner.snapshot().items()}
    return heads, np.concatenate(values), np.concatenate(masks), dict(aligner.counts), state


@pytest.mark.parametrize("seed", range(4))
def test_a_block_of_sensors_at_shared_times_is_added_as_each_sensor_alone(seed: int) -> None:
    """`add_block` (a message's sensors at shared times, checked once) leaves the aligner as
    `add_many` per sensor does: rows, counts and state."""

    def one_by_one(aligner: StreamAligner, sensor: int, ts: np.ndarray, v: np.ndarray) -> None:
        for j in range(N):
            aligner.add_many(j, ts, v + j)

    def block(aligner: StreamAligner, sensor: int, ts: np.ndarray, v: np.ndarray) -> None:
        aligner.add_block(list(range(N)), ts, [v + j for j in range(N)])

    def aligner() -> StreamAligner:
        return StreamAligner(N, 1.0, 2.0, 3.0, max_gap_slots=LENGTH)

    assert _same(_run(aligner(), seed, block), _run(aligner(), seed, one_by_one))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    heads_a, values_a, masks_a, counts_a, state_a = a
    heads_b, values_b, masks_b, counts_b, state_b = b
    np.testing.assert_array_equal(values_a, values_b)
    np.testing.assert_array_equal(masks_a, masks_b)
    assert (heads_a, counts_a, state_a) == (heads_b, counts_b, state_b)
    return True


@pytest.mark.parametrize("seed", range(6))
def test_rows_and_counts_are_those_of_the_plain_path(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows closed all at once per sensor equal rows closed one by one, and readings added in
    plain floats leave the aligner as the numpy version did: rows, gaps, counts, state."""

    def make() -> StreamAligner:
        return StreamAligner(N, 1.0, 2.0, lateness_s=3.0, max_gap_slots=LENGTH)

    plain = StreamAligner.add_many
    reference = _run(make(), seed, _numpy_add_many)
    got = _run(make(), seed, plain)
    monkeypatch.setattr(stream, "VECTOR_ROWS", 10**9)  # every row one by one
    by_row = _run(make(), seed, plain)
    monkeypatch.setattr(stream, "VECTOR_ROWS", 1)  # every row at once
    at_once = _run(make(), seed, plain)
    for other in (got, by_row, at_once):
        assert other[0] == reference[0]
        np.testing.assert_array_equal(other[1], reference[1])
        np.testing.assert_array_equal(other[2], reference[2])
        assert other[3] == reference[3]
        assert other[4] == reference[4]
    assert reference[3]["late"] and reference[3]["duplicate"] and reference[3]["gap_slots"]


class _ColumnByColumn(Decoder):
    """`Decoder._arrays` as it was, a column at a time: the reference."""

    def _arrays(
        self, topic: str, payload: bytes, route: Route, doc: dict[str, object], now: float
    ) -> list[Chunk] | None:
        raw_ts, raw_values = doc["ts"], doc["values"]
        assert isinstance(raw_ts, list) and isinstance(raw_values, dict)
        series = [(self.routes.sensor(route.asset, str(k)), c) for k, c in raw_values.items()]
        ts = self._times(raw_ts)
        if ts is None:
            self.drop("bad_timestamp", topic, payload, len(raw_ts))
            return None
        judged = self.bounds(route.asset, now)
        self.observe(route.asset, float(np.median(ts)), now)
        time_ok = self.time_reasons(ts, judged, topic, payload)
        chunks: list[Chunk] = []
        for sensor, column in series:
            if not isinstance(column, list) or len(column) != len(raw_ts):
                self.drop("bad_shape", topic, payload)
                continue
            if sensor < 0:
                self.drop("unknown_sensor", topic, payload, len(column))
                continue
            if not set(map(type, column)) <= {int, float}:
                self.drop("bad_type", topic, payload, len(column))
                continue
            values = np.asarray(column, dtype=np.float64)
            keep = time_ok & np.isfinite(values)
            bad_values = int((time_ok & ~np.isfinite(values)).sum())
            if bad_values:
                self.drop("non_finite", topic, payload, bad_values)
            kept = int(keep.sum())
            if kept:
                self.accepted += kept
                chunks.append(Chunk(route.asset, sensor, ts[keep], values[keep]))
        return chunks or None


def test_a_values_block_is_validated_as_it_was_column_by_column() -> None:
    """Arrays with NaN and infinite values (from a source other than JSON, which has none),
    far-future and far-past timestamps, an unknown sensor, a column with text and one of the
    wrong length keep and count exactly what the column-by-column decoder did."""
    now = 1_700_000_000.0
    routes = TopicRoutes([AssetConfig(name="pump-1", topics=["plant/pump-1/+"])], ("a", "b", "c"))
    route = Route(0, -1)
    rng = np.random.default_rng(7)
    for _ in range(200):
        block = Decoder(routes, IngestLimits(), clock=lambda: now)
        reference = _ColumnByColumn(routes, IngestLimits(), clock=lambda: now)
        size = int(rng.integers(1, 30))
        ts = (now - rng.choice([0.0, 1e3, 1e9, -1e9], size, p=[0.7, 0.1, 0.1, 0.1])).tolist()
        values: dict[str, Any] = {}
        for name in ("a", "b", "c", "zz")[: int(rng.integers(1, 5))]:
            column: list[Any] = rng.normal(size=size).tolist()
            for i in np.flatnonzero(rng.random(size) < 0.1):
                column[i] = rng.choice([math.nan, math.inf, -math.inf, 3, "x", None])
            if rng.random() < 0.1:
                column = column[:-1]
            values[name] = column
        doc: dict[str, object] = {"ts": ts, "values": values}
        got = block._arrays("t", b"", route, doc, now) or []
        want = reference._arrays("t", b"", route, doc, now) or []
        assert [c.sensor for c in got] == [c.sensor for c in want]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a.ts, b.ts)
            np.testing.assert_array_equal(a.values, b.values)
        assert block.accepted == reference.accepted
        assert block.drops == reference.drops
        assert block.clock_offset(0) == reference.clock_offset(0)
        assert list(block.clocks[0]._offsets) == list(reference.clocks[0]._offsets)


def test_the_stream_clock_median_is_that_of_its_last_messages() -> None:
    """Kept in order as offsets come and go, the median is the one sorted afresh."""
    rng = np.random.default_rng(3)
    clock = StreamClock()
    seen: list[float] = []
    for offset in rng.choice([-5.0, 0.0, 0.5, 3600.0, 7.25], 200).tolist():
        clock.observe(offset)
        seen = [*seen, offset][-CLOCK_MESSAGES:]
        want = statistics.median(seen) if len(seen) >= CLOCK_MIN_MESSAGES else 0.0
        assert clock.offset == want


def test_the_fair_queue_takes_in_the_old_round_robin_order() -> None:
    """Taking the rest of the last busy asset at once keeps the order of one message per
    asset in turn."""
    rng = np.random.default_rng(5)
    queue = FairQueue(3, 10**9, lambda asset, n: None)
    waiting: list[list[tuple[int, int, float, float]]] = [[], [], []]
    first = 0
    for step in range(300):
        for _ in range(int(rng.integers(0, 12))):
            asset = int(rng.choice(3, p=[0.7, 0.2, 0.1]))
            item = (asset, 0, float(step), 0.0)
            queue.put(item)
            waiting[asset].append(item)
        limit = int(rng.integers(1, 10))
        want: list[object] = []
        while len(want) < limit and any(waiting):
            for i in range(3):
                if waiting[(first + i) % 3] and len(want) < limit:
                    want.append(waiting[(first + i) % 3].pop(0))
        first = (first + 1) % 3
        assert queue.take(limit, 0.0) == want
