"""The sink thread between inference and the outbox: results waiting together are written in
one transaction, in order; a full queue holds inference back instead of dropping; stopping
keeps every result handed over. Decisions are stubbed (one record per window); the outbox is
the real one."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from edge_agent.batching import WindowJob
from edge_agent.decisions import Verdict
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import LossLog
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.sink import Records, ResultSink
from tests.support.agents import wait_for

pytestmark = pytest.mark.unit


class CountingOutbox(Outbox):
    """The real outbox, counting its transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 24)
        self.appends: list[int] = []  # records per append

    def append(
        self,
        records: Sequence[tuple[int, bytes]],
        scored: Mapping[str, float | None] | None = None,
        open_alerts: Mapping[str, str | None] | None = None,
    ) -> list[int]:
        self.appends.append(len(records))
        return super().append(records, scored, open_alerts)


def decide(
    jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict], records: Records
) -> None:
    records.extend((PREDICTION, f"{job.asset}@{job.window_end:g}".encode()) for job in jobs)


def batch(first: int, windows: int) -> tuple[list[WindowJob], Outputs]:
    empty = np.zeros((1, 1), np.float32)
    jobs = [WindowJob(a, empty, empty, 0.0, float(first)) for a in range(windows)]
    outputs = (np.zeros(windows), np.zeros((windows, 1)), np.zeros((windows, 1)))
    return jobs, outputs


def bodies(outbox: Outbox) -> list[bytes]:
    return [body for _, _, body in outbox.pending(0, 10_000)]


def expected(batches: int, windows: int) -> list[bytes]:
    return [f"{a}@{b}".encode() for b in range(batches) for a in range(windows)]


@pytest.fixture
def outbox(tmp_path: Path) -> CountingOutbox:
    return CountingOutbox(tmp_path / "outbox.sqlite3")


def sink_on(outbox: Outbox, backlog: int = 16) -> ResultSink:
    return ResultSink(decide, outbox, RuntimeCounters(), LossLog(), backlog=backlog)


def hold(sink: ResultSink) -> threading.Event:
    """Keeps the sink thread busy until the event is set (as a slow fsync would)."""
    release, busy = threading.Event(), threading.Event()

    def wait() -> None:
        busy.set()
        release.wait(30)

    sink.call(wait)
    assert busy.wait(10)
    return release


def test_results_waiting_together_go_into_the_outbox_in_one_transaction(
    outbox: CountingOutbox,
) -> None:
    sink = sink_on(outbox)
    sink.start()
    release = hold(sink)
    for b in range(8):
        sink.submit(*batch(b, 64))
    release.set()
    sink.stop()
    assert outbox.appends == [8 * 64]  # one fsync for the eight batches
    assert bodies(outbox) == expected(8, 64)  # in order, numbered in order
    seqs = [seq for seq, _, _ in outbox.pending(0, 10_000)]
    assert seqs == list(range(1, 8 * 64 + 1))


def test_stop_keeps_every_result_handed_over(outbox: CountingOutbox) -> None:
    sink = sink_on(outbox)
    sink.start()
    release = hold(sink)
    for b in range(5):
        sink.submit(*batch(b, 3))
    stopper = threading.Thread(target=sink.stop)
    stopper.start()
    release.set()
    stopper.join(10)
    assert not sink.running
    assert bodies(outbox) == expected(5, 3)


def test_a_full_queue_holds_inference_back_instead_of_dropping(outbox: CountingOutbox) -> None:
    sink = sink_on(outbox, backlog=2)
    sink.start()
    release = hold(sink)
    handed = []

    def inference() -> None:
        for b in range(5):
            sink.submit(*batch(b, 2))
            handed.append(b)

    producer = threading.Thread(target=inference)
    producer.start()
    time.sleep(0.5)
    assert producer.is_alive() and handed == [0, 1], handed  # waits on the third
    release.set()
    producer.join(10)
    sink.stop()
    assert handed == [0, 1, 2, 3, 4]
    assert bodies(outbox) == expected(5, 2)
    assert sum(outbox.appends) == 10 and len(outbox.appends) <= 4, outbox.appends


def test_a_sink_that_is_not_running_fails_the_batch_instead_of_hanging(
    outbox: CountingOutbox,
) -> None:
    sink = sink_on(outbox, backlog=1)
    sink.submit(*batch(0, 1))  # waits in the queue
    with pytest.raises(RuntimeError, match="sink thread is not running"):
        sink.submit(*batch(1, 1))


class FailingOnce(Outbox):
    """The real outbox whose next append raises an injected non-storage error (a stand-in
    for a bug or a damaged record part-way through a write)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 24)
        self.fail_next = False

    def append(
        self, records: Sequence[tuple[int, bytes]], scored: Mapping[str, float] | None = None
    ) -> list[int]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure of the write")
        return super().append(records, scored)


def alerting(
    jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict], records: Records
) -> None:
    """Each window: an alert event, then a prediction; a window ending at 13 fails between
    them (injected)."""
    for job in jobs:
        records.append((ALERT, f"alert {job.asset}@{job.window_end:g}".encode()))
        if job.window_end == 13:
            raise RuntimeError("injected failure of a decision")
        records.append((PREDICTION, f"{job.asset}@{job.window_end:g}".encode()))


def test_a_decision_failing_mid_batch_keeps_the_alert_events_made_before_it(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    sink = ResultSink(alerting, outbox, RuntimeCounters(), LossLog())
    sink.start()
    sink.submit(*batch(13, 1))
    sink.submit(*batch(14, 1))
    sink.stop()
    assert bodies(outbox) == [b"alert 0@13", b"alert 0@14", b"0@14"]
    assert sink.errors == 1


def test_a_failed_write_keeps_alert_events_for_the_next_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    outbox = FailingOnce(tmp_path / "outbox.sqlite3")
    counters, losses = RuntimeCounters(), LossLog()
    sink = ResultSink(alerting, outbox, counters, losses)
    sink.start()
    outbox.fail_next = True
    sink.submit(*batch(1, 2))  # two alert events and two predictions: the write fails
    sink.call(lambda: None)  # handled after it
    wait_for(lambda: counters.outbox_write_failed == 2, timeout=30)
    assert bodies(outbox) == []
    (stretch,) = losses.recent()
    assert stretch.records == 2 and stretch.ongoing and stretch.reason == "outbox_write_failed"
    sink.submit(*batch(2, 1))
    sink.stop()
    # The waiting alert events first, then the next batch; the lost predictions said so.
    assert bodies(outbox) == [b"alert 0@1", b"alert 1@1", b"alert 0@2", b"0@2"]
    assert counters.outbox_write_failed == 2 and sink.errors == 1
    (stretch,) = losses.recent()
    assert not stretch.ongoing


def test_the_window_ends_decided_are_kept_with_their_records(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    marks = {"pump-1": 40.0}
    sink = ResultSink(decide, outbox, RuntimeCounters(), LossLog(), scored=lambda: marks)
    sink.start()
    sink.submit(*batch(40, 1))
    sink.stop()
    assert outbox.scored_through() == {"pump-1": 40.0}
    # Back too: the asset's clock stepped back and its stream restarted at the new time.
    back: dict[str, float | None] = {"pump-1": 30.0}
    outbox.append([(PREDICTION, b"x")], back)
    assert outbox.scored_through() == {"pump-1": 30.0}
    back["pump-1"] = None  # restarted, nothing decided since: no mark
    outbox.append([(PREDICTION, b"y")], back)
    assert outbox.scored_through() == {}
