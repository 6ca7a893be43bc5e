"""Decoder (fuzzed), streaming alignment (against the offline one), decisions, outbox."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import AssetConfig, DecisionPolicy, IngestLimits
from edge_agent.decisions import CLEARED, RAISED, AssetDecider
from edge_agent.ingest.decode import CLOCK_MIN_MESSAGES, DROP_REASONS, Chunk, Decoder, TopicRoutes
from edge_agent.ingest.stream import StreamAligner
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.windowing import align_to_grid

NOW = 1_700_000_000.0
SENSORS = ("flow", "pressure", "current")


def decoder() -> Decoder:
    assets = [
        AssetConfig(name="pump-1", topics=["plant/pump-1/+"], sensors={"p": "pressure"}),
        AssetConfig(name="pump-2", topics=["plant/pump-2/#"]),
    ]
    return Decoder(TopicRoutes(assets, SENSORS), IngestLimits(), clock=lambda: NOW)


def test_accepted_forms() -> None:
    d = decoder()
    assert d.decode("plant/pump-1/flow", b'{"ts": 1700000000.5, "value": 3}') == (
        0,
        0,
        1_700_000_000.5,
        3.0,
    )
    # A rename on the wire, milliseconds, and ISO text with a zone.
    assert d.decode("plant/pump-1/p", b'{"ts": 1700000000500, "value": 1.5}') == (
        0,
        1,
        1_700_000_000.5,
        1.5,
    )
    single = d.decode(
        "plant/pump-1/x", b'{"sensor": "current", "ts": "2023-11-14T22:13:20+00:00", "value": 2}'
    )
    assert single == (0, 2, 1_700_000_000.0, 2.0)
    arrays = d.decode("plant/pump-2/a/flow", b'{"ts": [1700000000, 1700000001], "values": [1, 2]}')
    assert (
        isinstance(arrays, list) and arrays[0].sensor == 0 and arrays[0].values.tolist() == [1, 2]
    )
    multi = d.decode(
        "plant/pump-2/batch",
        orjson.dumps({"ts": [NOW, NOW + 1], "values": {"flow": [1, 2], "current": [5, 6]}}),
    )
    assert isinstance(multi, list) and sorted(c.sensor for c in multi) == [0, 2]
    listed = d.decode(
        "plant/pump-2/batch",
        orjson.dumps(
            [
                {"sensor": "flow", "ts": NOW, "value": 1},
                {"sensor": "pressure", "ts": NOW, "value": 2},
            ]
        ),
    )
    assert isinstance(listed, list) and len(listed) == 2
    assert not d.drops


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("plant/pump-1/flow", b"not json", "not_json"),
        ("plant/pump-1/flow", b'{"ts": 1700000000, "value": "3"}', "bad_type"),
        ("plant/pump-1/flow", b'{"ts": 1700000000, "value": true}', "bad_type"),
        ("plant/pump-1/flow", b'{"ts": 1700000000, "value": 1e400}', "not_json"),
        ("plant/pump-1/flow", b'{"ts": "yesterday", "value": 3}', "bad_timestamp"),
        ("plant/pump-1/flow", b'{"ts": 1800000000, "value": 3}', "ts_future"),
        ("plant/pump-1/flow", b'{"ts": 1000000000, "value": 3}', "ts_past"),
        ("plant/pump-1/flow", b'{"ts": 1e22, "value": 3}', "bad_timestamp"),  # 1e19 s
        ("plant/pump-1/flow", b'{"ts": -5, "value": 3}', "bad_timestamp"),
        ("plant/pump-1/flow", b'{"ts": "2200-01-01T00:00:00Z", "value": 3}', "bad_timestamp"),
        ("plant/pump-1/flow", b'{"ts": [1e22], "values": [1]}', "bad_timestamp"),
        ("plant/pump-1/flow", b'{"ts": 1700000000, "value": 1e39}', "out_of_range"),
        ("plant/pump-1/flow", b'{"ts": 1700000000, "value": -3.4028235e38}', "out_of_range"),
        ("plant/pump-1/vibration", b'{"ts": 1700000000, "value": 3}', "unknown_sensor"),
        ("plant/pump-9/flow", b'{"ts": 1700000000, "value": 3}', "unknown_topic"),
        ("plant/pump-1/flow", b'{"ts": [1700000000], "values": [1, 2]}', "bad_shape"),
        ("plant/pump-1/flow", b'{"hello": 1}', "bad_shape"),
        ("plant/pump-1/flow", b"[]", "bad_shape"),
        ("plant/pump-1/flow", b"x" * (2 << 20), "oversized"),
    ],
)
def test_each_bad_input_is_dropped_and_counted(topic: str, payload: bytes, reason: str) -> None:
    d = decoder()
    assert d.decode(topic, payload) is None
    assert d.drops == {reason: 1}


def test_hostile_timestamps_cannot_move_the_stream_clock() -> None:
    """A flood of timestamps no clock gives (1e22 read as ms: 1e19 s) used to move the asset's
    stream clock there after 8 messages; readings were then accepted at slot numbers that
    overflowed the grid and stopped the pipeline for every asset. They are bad timestamps:
    not observed, and the asset's real readings keep being accepted."""
    d = decoder()
    for _ in range(4 * CLOCK_MIN_MESSAGES):
        assert d.decode("plant/pump-1/flow", b'{"ts": 1e22, "value": 1}') is None
        assert d.decode("plant/pump-1/flow", b'{"ts": [1e22, 1e22], "values": [1, 2]}') is None
    assert d.drops == {"bad_timestamp": 12 * CLOCK_MIN_MESSAGES}, d.drops
    assert d.clock_offset(0) == 0.0
    assert d.decode("plant/pump-1/flow", b'{"ts": 1700000000, "value": 1}') == (0, 0, NOW, 1.0)


def test_an_arrays_row_with_a_time_no_clock_gives_goes_alone() -> None:
    """One row stamped 4294967295 (a uint32 'invalid' time, in 2106) among good ones: that row
    is a bad timestamp, the others are kept, and the clock sees only the good ones."""
    d = decoder()
    message = {
        "ts": [NOW, NOW + 1, 4294967295],
        "values": {"flow": [1, 2, 3], "current": [4, 5, 6]},
    }
    chunks = d.decode("plant/pump-2/batch", orjson.dumps(message))
    assert isinstance(chunks, list) and [c.values.tolist() for c in chunks] == [[1, 2], [4, 5]]
    assert [c.ts.tolist() for c in chunks] == [[NOW, NOW + 1]] * 2
    assert d.drops == {"bad_timestamp": 1}, d.drops


def test_values_beyond_the_reading_limit_are_counted_apart_from_non_finite_ones() -> None:
    """An arrays block with NaN (only from non-JSON sources) and a float32 'no data' sentinel:
    each counted under its own reason, the rest kept."""
    d = decoder()
    message = {"ts": [NOW, NOW + 1, NOW + 2], "values": {"flow": [1.0, 3.4028235e38, 2.0]}}
    chunks = d.decode("plant/pump-2/batch", orjson.dumps(message))
    assert isinstance(chunks, list) and chunks[0].values.tolist() == [1.0, 2.0]
    assert d.drops == {"out_of_range": 1}


def test_without_a_model_everything_is_counted_as_no_model() -> None:
    d = Decoder(
        TopicRoutes([AssetConfig(name="a", topics=["a/+"])], None), IngestLimits(), lambda: NOW
    )
    assert d.decode("a/flow", b'{"ts": 1700000000, "value": 1}') is None
    assert d.drops == {"no_model": 1}


def _json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from([NOW, NOW * 1000, "2023-11-14T22:13:20Z"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.dictionaries(
                st.sampled_from(["ts", "value", "values", "sensor", "flow", "x"]), inner, max_size=5
            ),
        ),
        max_leaves=20,
    )


_TOPICS = st.sampled_from(
    ["plant/pump-1/flow", "plant/pump-1/p", "plant/pump-2/batch", "plant/pump-1/zz", "other/t"]
)


def _count(decoded: object) -> int:
    if decoded is None:
        return 0
    if isinstance(decoded, tuple):
        return 1
    assert isinstance(decoded, list)
    for chunk in decoded:
        assert isinstance(chunk, Chunk)
        assert chunk.ts.shape == chunk.values.shape and np.isfinite(chunk.values).all()
    return sum(int(c.ts.size) for c in decoded)


@settings(max_examples=6000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=_TOPICS, doc=_json_values())
def test_fuzzed_json_never_raises_and_every_message_is_accounted_for(
    topic: str, doc: object
) -> None:
    d = decoder()
    payload = orjson.dumps(doc)
    accepted = _count(d.decode(topic, payload))
    assert set(d.drops) <= set(DROP_REASONS)
    assert accepted == d.accepted
    assert accepted > 0 or sum(d.drops.values()) > 0, "a message vanished without a count"


@settings(max_examples=5000, deadline=None)
@given(topic=_TOPICS, payload=st.binary(max_size=200))
def test_fuzzed_bytes_never_raise(topic: str, payload: bytes) -> None:
    d = decoder()
    accepted = _count(d.decode(topic, payload))
    assert accepted > 0 or sum(d.drops.values()) == 1


# ---- streaming alignment ----
def test_streaming_alignment_matches_the_offline_one_under_shuffling() -> None:
    """Readings arriving out of order (within the lateness), duplicated and missing give the
    rows `align_to_grid` computes from the sorted history."""
    rng = np.random.default_rng(4)
    rows, n = 400, 3
    times = 1_700_000_000.0 + np.arange(rows, dtype=np.float64)
    values = rng.normal(size=(rows, n)).astype(np.float32)
    values[rng.random((rows, n)) < 0.1] = np.nan  # missing readings
    offline = align_to_grid(times, values, 1.0, 2.0)
    # Slots closed only by the lateness: complete slots would close before a reading that
    # arrives out of order is sorted in (see the next test).
    aligner = StreamAligner(n, 1.0, 2.0, lateness_s=3.0, max_gap_slots=1000, close_complete=False)
    readings = [
        (j, times[r], float(values[r, j]))
        for r in range(rows)
        for j in range(n)
        if not math.isnan(values[r, j])
    ]
    # Local shuffles: each reading moves at most ~2 s, inside the lateness.
    keys = np.array([t for _, t, _ in readings]) + rng.uniform(0, 2.0, len(readings))
    order = np.argsort(keys, kind="stable")
    got_v, got_m = [], []
    for i in order:
        j, t, v = readings[i]
        aligner.add(j, t, v)
        if rng.random() < 0.05:
            aligner.add(j, t, v + 100.0)  # a duplicate with another value: the first one wins
        closed = aligner.close_ready()
        if closed is not None:
            got_v.append(closed.values)
            got_m.append(closed.mask)
    aligner.watermark += 10  # flush
    closed = aligner.close_ready()
    assert closed is not None
    got_v.append(closed.values)
    got_m.append(closed.mask)
    v = np.concatenate(got_v)[:rows]
    m = np.concatenate(got_m)[:rows]
    np.testing.assert_array_equal(m, offline.mask)
    np.testing.assert_allclose(v * m, offline.values * offline.mask)
    assert aligner.counts["duplicate"] > 0 and aligner.counts["out_of_order"] > 0
    assert aligner.counts["late"] == 0


def test_a_slot_closes_once_every_sensor_has_a_reading_at_or_after_it() -> None:
    """Real time: with each sensor's readings in order (sensors interleaved in any order, one
    sensor up to 2 s behind the others), a slot closes as soon as its last sensor reports
    it, not a lateness later, and the rows are still exactly the offline ones."""
    rng = np.random.default_rng(5)
    rows, n = 300, 3
    times = 1_700_000_000.0 + np.arange(rows, dtype=np.float64)
    values = rng.normal(size=(rows, n)).astype(np.float32)
    offline = align_to_grid(times, values, 1.0, 2.0)
    aligner = StreamAligner(n, 1.0, 2.0, lateness_s=30.0, max_gap_slots=1000)
    delay = np.array([0.0, 0.3, 2.0])  # per sensor: arrival = ts + delay + jitter < 1 s
    arrivals = [
        (times[r] + delay[j] + rng.uniform(0, 0.5), j, r) for r in range(rows) for j in range(n)
    ]
    got_v, got_m, waited = [], [], []
    for arrival, j, r in sorted(arrivals):
        aligner.add(j, float(times[r]), float(values[r, j]))
        while (closed := aligner.close_ready(now=arrival)) is not None:
            got_v.append(closed.values)
            got_m.append(closed.mask)
            last = closed.first_slot + closed.values.shape[0] - 1
            waited.append(arrival - last)  # from the slot's time to its closing
    v, m = np.concatenate(got_v), np.concatenate(got_m)
    assert v.shape[0] == rows  # all closed without a flush: the last slot is complete too
    np.testing.assert_array_equal(m, offline.mask)
    np.testing.assert_allclose(v, offline.values)
    assert aligner.counts["late"] == 0
    assert max(waited) < 3.0, f"a slot waited {max(waited):.2f} s (the slowest sensor: 2.5 s)"


def test_a_slot_closes_with_the_last_reading_due_before_it() -> None:
    """Readings at k + 0.4 s every second: slot k + 1 takes its value from the reading at
    k + 0.4 and closes when that reading arrives (the next is not due before k + 1.3), not a
    period later when the reading past it comes."""
    aligner = StreamAligner(2, 1.0, 2.0, lateness_s=2.0, max_gap_slots=1000)
    closed_at = {}
    for k in range(100, 120):
        for j in (0, 1):
            aligner.add(j, k + 0.4, float(k))
        now = k + 0.45  # arrival
        while (rows := aligner.close_ready(now)) is not None:
            for i in range(rows.values.shape[0]):
                closed_at[rows.first_slot + i] = (now, rows.values[i, 0])
    assert closed_at[110] == (109.45, 109.0), closed_at[110]
    assert max(closed_at) == 120


def test_a_sensor_seen_out_of_order_waits_for_the_lateness_again() -> None:
    aligner = StreamAligner(2, 1.0, 2.0, lateness_s=5.0, max_gap_slots=1000)
    for t in (100.0, 101.0):
        aligner.add(0, t, 1.0)
        aligner.add(1, t, 1.0)
    rows = aligner.close_ready()
    assert rows is not None and rows.first_slot + rows.values.shape[0] - 1 == 101
    aligner.add(0, 103.0, 1.0)
    aligner.add(1, 103.0, 1.0)
    aligner.add(1, 102.0, 2.0)  # sensor 1 out of order: sorted in, and no longer trusted
    assert aligner.close_ready() is None  # slot 102 waits for the lateness (until 107)
    for t in (104.0, 105.0, 106.0, 107.0):
        aligner.add(0, t, 1.0)
        aligner.add(1, t, 1.0)
    rows = aligner.close_ready()
    assert rows is not None and rows.first_slot == 102 and rows.values.shape[0] == 1
    assert rows.values[0, 1] == 2.0 and aligner.counts["late"] == 0


def test_late_readings_are_dropped_and_gaps_skipped() -> None:
    aligner = StreamAligner(1, 1.0, 2.0, lateness_s=1.0, max_gap_slots=50)
    for t in range(100, 110):
        aligner.add(0, float(t), 1.0)
    rows = aligner.close_ready()  # up to slot 109: its one sensor has reported it
    assert rows is not None and rows.first_slot == 100 and rows.values.shape[0] == 10
    aligner.add(0, 101.0, 5.0)
    assert aligner.counts["late"] == 1
    aligner.add_many(0, np.array([50_000.0, 50_001.0, 50_002.0]), np.array([1.0] * 3))
    rows = aligner.close_ready()
    # The stream restarts at the next reading: no empty rows for the gap.
    assert rows is not None and rows.gap and rows.first_slot == 50_000
    assert rows.values.shape[0] == 2 and rows.mask.all()
    assert aligner.counts["gap_slots"] > 40_000


def test_one_reading_stamped_ahead_of_the_clock_does_not_make_the_rest_late() -> None:
    aligner = StreamAligner(1, 1.0, 2.0, lateness_s=1.0, max_gap_slots=50)
    now = 1000.0
    for t in range(990, 1000):
        aligner.add(0, float(t), 1.0)
    aligner.add(0, now + 290.0, 9.0)  # one outlier, within ingest.max_future_s
    rows = aligner.close_ready(now)
    assert rows is not None and rows.first_slot + rows.values.shape[0] - 1 == 999
    closed = []
    for t in range(1000, 1010):  # the asset's next ten seconds arrive on time
        aligner.add(0, float(t), 2.0)
        if (rows := aligner.close_ready(t + 0.5)) is not None:
            closed.extend(rows.values[:, 0].tolist())
    assert aligner.counts["late"] == 0
    assert closed == [2.0] * 9  # slots 1000..1008 from their own readings


def _reading(ts: float, value: float = 1.0) -> bytes:
    return f'{{"ts": {ts}, "value": {value}}}'.encode()


def test_a_stream_an_hour_ahead_is_followed_after_a_few_messages_and_reported() -> None:
    d = decoder()
    kept = [d.decode("plant/pump-1/flow", _reading(NOW + 3600 + i)) for i in range(40)]
    dropped = sum(1 for k in kept if k is None)
    assert dropped == CLOCK_MIN_MESSAGES, dropped  # judged by the device's clock until then
    assert d.drops["ts_future"] == dropped
    assert abs(d.clock_offset(0) - 3600) < 40
    # One outlier cannot move it; the other asset keeps the device's clock.
    d.decode("plant/pump-1/flow", _reading(NOW - 86_400))
    assert abs(d.clock_offset(0) - 3600) < 40 and d.clock_offset(1) == 0.0


def test_a_backlog_delivered_late_does_not_make_the_live_readings_future() -> None:
    d = decoder()
    for i in range(60):  # an hour-old backlog a broker delivers after an outage
        assert d.decode("plant/pump-1/flow", _reading(NOW - 3600 + i)) is not None
    assert d.clock_offset(0) < -3500
    for i in range(5):  # then the live stream
        assert d.decode("plant/pump-1/flow", _reading(NOW + i)) is not None
    assert d.drops["ts_future"] == 0


# ---- decisions ----
def test_k_of_n_raises_once_and_clears_with_the_same_key() -> None:
    policy = DecisionPolicy(raise_at=1.0, clear_at=0.8, k=3, n=5)
    decider = AssetDecider("pump-1", SENSORS, policy, smoothing=1, model_version="7")
    evidence = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    events = []
    scores = [0.2, 1.5, 0.2, 1.5, 0.3, 1.2, 1.3, 1.4, 1.5, 0.5, 0.4, 0.3, 0.2]
    for i, s in enumerate(scores):
        verdict = decider.step(s, evidence, float(i), float(i) + 1)
        if verdict.event is not None:
            events.append((i, verdict.event))
    assert [(i, e.kind) for i, e in events] == [(5, RAISED), (11, CLEARED)]
    raised, cleared = events[0][1], events[1][1]
    assert raised.key == cleared.key and raised.top_sensors[0][0] == "flow"


# ---- outbox ----
def test_outbox_bounds_evict_predictions_never_alerts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 16)
    box.append([(ALERT, b"a" * 1000)])
    for _ in range(20):
        box.append([(PREDICTION, b"p" * 1000)] * 10)
    stats = box.stats()
    assert stats.bytes <= 1 << 16 and stats.evicted > 0
    kinds = [k for _, k, _ in box.pending(0, 10_000)]
    assert kinds[0] == ALERT
    assert box.ack(5) >= 1 and box.stats().acked == 5
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 16)
    assert again.stats().next_sequence == stats.next_sequence and again.acked == 5
    again.close()


def test_records_the_control_plane_refuses_go_to_quarantine_and_are_counted(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 20)
    box.append([(PREDICTION, b"good"), (ALERT, b"bad"), (PREDICTION, b"good")])
    assert box.ack(3, {2: "records[1]: alert.asset: 65 characters > 64"}) == 3
    assert box.pending(0, 10) == []  # acknowledged: never resent
    assert box.quarantined() == [(2, ALERT, b"bad", "records[1]: alert.asset: 65 characters > 64")]
    assert box.stats().quarantined == 1
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", max_bytes=1 << 20)  # kept across restarts
    assert again.stats().quarantined == 1 and len(again.quarantined()) == 1
    again.close()


_WRITER = """
import sys
from pathlib import Path
from edge_agent.outbox import Outbox, PREDICTION
box = Outbox(Path(sys.argv[1]), max_bytes=1 << 30)
i = 0
while True:
    seqs = box.append([(PREDICTION, b"%d" % (i + k)) for k in range(50)])
    i += 50
    print(seqs[-1], flush=True)
"""


def test_outbox_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    confirmed = 0
    deadline = time.monotonic() + 30
    while confirmed < 2000 and time.monotonic() < deadline:
        confirmed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    box = Outbox(path, max_bytes=1 << 30)
    rows = box.pending(0, 1_000_000)
    seqs = [s for s, _, _ in rows]
    # Everything the writer saw committed is there, in order, without holes; nothing half-written.
    assert len(seqs) >= confirmed and seqs == list(range(1, len(seqs) + 1))
    assert all(body == b"%d" % (s - 1) for s, _, body in rows)
    assert box.append([(PREDICTION, b"next")]) == [len(seqs) + 1]
    box.close()


def test_publish_streams_interleaves_in_time_and_never_stamps_the_future() -> None:
    from edge_agent.simulate import Fault, publish_streams, pump_stream

    now = [1000.0]
    long, short = pump_stream(60, []), pump_stream(20, [Fault("bearing", 5, 10)])
    published: list[tuple[str, float]] = []
    reported: list[tuple[int, float, float]] = []

    def publish(topic: str, payload: bytes) -> None:
        ts = orjson.loads(payload)["ts"]
        published.append((topic, now[0]))
        assert max(ts) <= now[0] + 1e-6, "a reading stamped after it was published"

    def sleep(seconds: float) -> None:
        now[0] += seconds

    sent = publish_streams(
        publish,
        [("a", long), ("b", short)],
        speed=10,
        batch=5,
        on_sent=lambda i, offset, ts: reported.append((i, offset, ts)),
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert sent == len(published) == 12 + 4
    assert [i for i, _, _ in reported].count(1) == 4  # each message names its own stream
    offsets = [offset for _, offset, _ in reported]
    assert offsets == sorted(offsets)  # interleaved by time, not one stream after the other
    assert published[-1][1] == pytest.approx(1000.0 + 59 / 10)  # 10x real time
    # Each stream ends "now": its last reading is stamped when it is published.
    last_b = max(r for r in reported if r[0] == 1)
    assert last_b[2] == pytest.approx(1000.0 + 19 / 10)


@pytest.mark.parametrize("before", ["restart", "long_first_interval"])
def test_a_silence_is_not_taken_for_a_sampling_interval(before: str) -> None:
    """After a graceful restart (its state kept, the stream silent meanwhile) or a long wait
    between a sensor's first readings, slots are not closed ahead of readings that come in
    order: nothing is dropped as late."""
    aligner = StreamAligner(2, 1.0, 5.0, lateness_s=2.0, max_gap_slots=1000)
    if before == "restart":
        for t in range(100, 120):
            aligner.add(0, float(t), 1.0)
            aligner.add(1, float(t), 1.0)
            aligner.close_ready()
        state = aligner.snapshot()
        aligner = StreamAligner(2, 1.0, 5.0, lateness_s=2.0, max_gap_slots=1000)
        aligner.restore(state)
        start = 180  # a minute of readings lost while it was down
    else:
        for j in (0, 1):
            aligner.add(j, 100.0, 1.0)
        start = 130
    for t in range(start, start + 20):
        for j in (0, 1):
            aligner.add(j, float(t), 2.0)
            aligner.close_ready(now=t + 0.1)
    assert aligner.counts["late"] == 0, aligner.counts


def test_readings_waiting_for_their_time_are_trimmed_duplicates_first_then_the_newest() -> None:
    """A flood stamped ahead of now (within ingest.max_future_s) waits in the aligner until
    its slots close: without a bound it held ~74 bytes a reading and every close re-sorted
    it. `trim` keeps the oldest `limit` slots' worth per sensor and counts the rest."""
    aligner = StreamAligner(2, 1.0, 2.0, lateness_s=3.0, max_gap_slots=60)
    ahead = NOW + 10.0 + np.arange(3000, dtype=np.float64)  # one a slot, 50 minutes ahead
    aligner.add_many(0, ahead[::-1].copy(), np.ones(3000))  # out of order
    aligner.add_many(0, ahead[:500], np.full(500, 2.0))  # repeated timestamps
    aligner.add_many(1, ahead[:50], np.ones(50))
    assert aligner.close_ready(NOW) is None  # nothing is due yet
    assert aligner.trim(1000) == 2000
    assert aligner.counts["duplicate"] == 500 and aligner.counts["backlog_full"] == 2000
    assert aligner.pending_readings == 1000 + 50
    assert aligner.trim(1000) == 0  # under the limit: nothing more goes
    rows = aligner.close_ready(NOW + 4000.0)
    assert rows is not None and rows.first_slot == int(NOW + 10.0)
    kept = rows.mask[:, 0] > 0  # the oldest 1,000 slots (and 2 s stale after them)
    assert kept[:1000].all() and not kept[1003:].any(), np.flatnonzero(kept)


def test_trimming_a_sensor_faster_than_the_grid_loses_nothing() -> None:
    """100 readings a slot, 50 slots waiting: 5,000 readings over a limit of 1,000, but only
    the last of each slot can ever be used, so trimming keeps those and the rows closed are
    exactly those of an aligner never trimmed."""
    rng = np.random.default_rng(3)
    times = NOW + 10.0 + np.arange(5000, dtype=np.float64) * 0.01
    values = rng.normal(size=5000)
    trimmed, whole = (
        StreamAligner(1, 1.0, 2.0, lateness_s=3.0, max_gap_slots=60) for _ in range(2)
    )
    for aligner in (trimmed, whole):
        aligner.add_many(0, times, values)
    assert trimmed.trim(1000) == 0 and trimmed.pending_readings <= 51
    assert not trimmed.counts["backlog_full"]
    a, b = trimmed.close_ready(NOW + 100.0), whole.close_ready(NOW + 100.0)
    assert a is not None and b is not None and a.first_slot == b.first_slot
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.mask, b.mask)
