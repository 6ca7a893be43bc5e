"""The sink thread between inference and the outbox: results waiting together are written in
one transaction, in order; a full queue holds inference back instead of dropping; stopping
keeps every result handed over. Decisions are stubbed (one record per window); the outbox is
the real one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from edge_agent.batching import WindowJob
from edge_agent.decisions import Verdict
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import LossLog
from edge_agent.outbox import PREDICTION, Outbox
from edge_agent.sink import Records, ResultSink

pytestmark = pytest.mark.unit


class CountingOutbox(Outbox):
    """The real outbox, counting its transactions."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 24)
        self.appends: list[int] = []  # records per append

    def append(self, records: Sequence[tuple[int, bytes]]) -> list[int]:
        self.appends.append(len(records))
        return super().append(records)


def decide(jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict]) -> Records:
    return [(PREDICTION, f"{job.asset}@{job.window_end:g}".encode()) for job in jobs]


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
