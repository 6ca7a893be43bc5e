"""Where scoring got to is written without records too: windows decided without records
(`outbox.prediction_every` keeps one in N) have their marks written once they are
`mark_every_s` old, also when no result follows, and no more often than that. The sink and
outbox are the real ones, with an injected clock; decisions are stubbed."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from edge_agent.batching import WindowJob
from edge_agent.decisions import Verdict
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import LossLog
from edge_agent.outbox import PREDICTION
from edge_agent.sink import Records, ResultSink
from tests.support.agents import wait_for
from tests.test_sink import CountingOutbox

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Quiet:
    """Decisions keeping a record for every 10th window only (prediction_every: 10)."""

    def __init__(self) -> None:
        self.marks: dict[str, float | None] = {}

    def __call__(
        self, jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict], records: Records
    ) -> None:
        for job in jobs:
            self.marks["pump-1"] = job.window_end
            if job.window_end % 10 == 0:
                records.append((PREDICTION, f"{job.window_end:g}".encode()))


def window(end: int) -> tuple[list[WindowJob], Outputs]:
    empty = np.zeros((1, 1), np.float32)
    return [WindowJob(0, empty, empty, 0.0, float(end))], (
        np.zeros(1),
        np.zeros((1, 1)),
        np.zeros((1, 1)),
    )


def settle(sink: ResultSink) -> None:
    """Until everything handed over before is handled (marks written included): a task runs
    before its group's writes, so a second one, handed over after the first ran, is waited."""
    for _ in range(2):
        ran = threading.Event()
        sink.call(ran.set)
        assert ran.wait(30)


def sink_on(outbox: CountingOutbox, quiet: Quiet, clock: Clock, every: float) -> ResultSink:
    return ResultSink(
        quiet,
        outbox,
        RuntimeCounters(),
        LossLog(),
        scored=lambda: dict(quiet.marks),
        mark_every_s=every,
        clock=clock,
    )


def test_marks_of_windows_without_records_are_written_every_mark_every_s(
    tmp_path: Path,
) -> None:
    outbox, quiet, clock = CountingOutbox(tmp_path / "outbox.sqlite3"), Quiet(), Clock()
    sink = sink_on(outbox, quiet, clock, every=5.0)
    sink.start()
    clock.now = 1.0
    for end in range(1, 10):  # no record: not written before they are 5 s old
        sink.submit(*window(end))
    settle(sink)
    assert outbox.scored_through() == {} and outbox.appends == [], outbox.appends
    clock.now = 5.0
    sink.submit(*window(11))
    settle(sink)
    assert outbox.scored_through() == {"pump-1": 11.0}, "windows decided without records"
    assert outbox.appends == [0], outbox.appends  # the marks alone
    clock.now = 9.9  # many more windows, not one write each
    for end in range(12, 20):
        sink.submit(*window(end))
    settle(sink)
    assert outbox.appends == [0] and outbox.scored_through() == {"pump-1": 11.0}
    clock.now = 11.0
    sink.submit(*window(20))  # a record: the marks go with it, and wait 5 s again
    sink.submit(*window(21))
    settle(sink)
    assert outbox.scored_through() == {"pump-1": 21.0}
    assert outbox.appends == [0, 1], outbox.appends
    clock.now = 15.9
    sink.submit(*window(22))
    settle(sink)
    assert outbox.appends == [0, 1], outbox.appends
    sink.stop()


def test_marks_are_written_when_no_result_follows(tmp_path: Path) -> None:
    """The last windows before the stream went quiet (or before a kill -9): written once
    `mark_every_s` old, without waiting for another result."""
    outbox, quiet, clock = CountingOutbox(tmp_path / "outbox.sqlite3"), Quiet(), Clock()
    sink = sink_on(outbox, quiet, clock, every=0.2)
    sink.start()
    for end in range(1, 6):
        sink.submit(*window(end))
    settle(sink)
    assert outbox.scored_through() == {}  # not 0.2 s old yet
    clock.now = 0.2
    wait_for(lambda: outbox.scored_through() == {"pump-1": 5.0}, timeout=30)
    assert outbox.appends == [0], outbox.appends
    clock.now = 10.0  # nothing decided since: nothing to write
    settle(sink)
    assert outbox.appends == [0], outbox.appends
    sink.stop()
