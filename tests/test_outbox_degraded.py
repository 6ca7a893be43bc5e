"""An agent whose outbox cannot be opened at start (a full or read-only disk) still starts:
the outbox runs degraded (alert events wait in memory, predictions are counted as lost), the
reason names the disk's state and is in health, the heartbeat and readiness, and the outbox
opens again by itself once it can, the waiting alert events written first.

Before, Outbox.__init__'s error escaped Agent.__init__: the agent did not start, so site
alerting (which needs no disk) was down too, and the message did not say why."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent import outbox_files
from edge_agent.agent import Agent
from edge_agent.batching import WindowJob
from edge_agent.config import load_agent_config
from edge_agent.decisions import Verdict
from edge_agent.errors import LocalStateError
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import LossLog
from edge_agent.metrics import health_problems
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.outbox_space import DiskSpace
from edge_agent.sink import ResultSink
from tests.conftest import register
from tests.support.agents import enroll_identity, wait_for
from tests.support.cloud import RunningPlane
from tests.support.mounts import mounted_tmpfs

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """While `[0]` is True, the outbox database cannot be opened as on a full disk (SQLite
    fails to write the WAL header) and statvfs says 0 bytes free."""
    full = [True]
    real_open = outbox_files.open_database
    real_free = DiskSpace.free

    def open_database(path: Path) -> sqlite3.Connection:
        if full[0]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_open(path)

    monkeypatch.setattr(outbox_files, "open_database", open_database)
    monkeypatch.setattr(DiskSpace, "free", lambda self: 0 if full[0] else real_free(self))
    yield full


@pytest.mark.unit
def test_an_outbox_that_cannot_be_opened_runs_degraded_and_opens_again(
    tmp_path: Path, full_disk: list[bool]
) -> None:
    path = tmp_path / "outbox.sqlite3"
    full_disk[0] = False
    before = Outbox(path, 1 << 24, ballast_bytes=0)
    before.append([(PREDICTION, b"p")] * 3, {"pump-1": 7.0}, {"pump-1": '{"open": 1}'})
    before.close()

    full_disk[0] = True
    with pytest.raises(LocalStateError, match=r"full \(ENOSPC\): 0 bytes free"):
        Outbox(path, 1 << 24)  # not allowed to run degraded: says why
    clock = Clock()
    box = Outbox(path, 1 << 24, degraded_ok=True, retry_s=30.0, clock=clock)
    assert box.problem is not None and "is full (ENOSPC): 0 bytes free" in box.problem
    assert str(path) in box.problem
    # What it kept is read without writing: no alert raised twice, no window scored twice.
    assert box.open_alert_events() == {"pump-1": '{"open": 1}'}
    assert box.scored_through() == {"pump-1": 7.0}
    assert box.pending(0, 10) == []

    def decide(jobs: Any, outputs: Outputs, verdicts: list[Verdict], records: Any) -> None:
        records.extend([(ALERT, b"alert"), (PREDICTION, b"lost")])

    counters = RuntimeCounters()
    sink = ResultSink(decide, box, counters, LossLog())
    sink.start()
    job = WindowJob(0, np.zeros((1, 1)), np.zeros((1, 1)), 0.0, 1.0)
    outputs = (np.zeros(1), np.zeros((1, 1)), np.zeros((1, 1)))
    try:
        sink.submit([job], outputs)
        wait_for(lambda: counters.outbox_write_failed == 1)  # the prediction; the alert waits

        full_disk[0] = False  # space again, but not retried before retry_s
        sink.submit([job], outputs)
        wait_for(lambda: counters.outbox_write_failed == 2)
        assert box.problem is not None

        clock.now += 30.0
        sink.submit([job], outputs)
        wait_for(lambda: box.stats().depth == 3 + 4)
    finally:
        sink.stop()
    assert box.problem is None
    rows = box.pending(0, 100)
    assert [s for s, _, _ in rows] == [1, 2, 3, 4, 5, 6, 7]  # numbering goes on
    # The alert events that waited in memory, then this batch's: none lost.
    assert [k for _, k, _ in rows[3:]] == [ALERT, ALERT, ALERT, PREDICTION]
    assert counters.outbox_write_failed == 2
    box.close()


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs remounted read-only, where this process may (root); skipped elsewhere."""
    with mounted_tmpfs(tmp_path / "mnt", "16m", "mounting a file system needs root") as mnt:
        yield mnt


@pytest.mark.integration
def test_on_a_read_only_disk_the_outbox_says_so_and_opens_once_writable(
    read_only_disk: Path,
) -> None:
    path = read_only_disk / "state" / "outbox.sqlite3"
    before = Outbox(path, 1 << 24, ballast_bytes=MIB)
    before.append([(PREDICTION, b"p")], {"pump-1": 3.0}, {"pump-1": '{"open": 1}'})
    before.close()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_disk)], check=True)
    try:
        clock = Clock()
        box = Outbox(path, 1 << 24, degraded_ok=True, clock=clock)
        assert box.problem is not None and "read-only (EROFS)" in box.problem, box.problem
        assert box.open_alert_events() == {"pump-1": '{"open": 1}'}
        assert box.scored_through() == {"pump-1": 3.0}
        with pytest.raises(LocalStateError, match="EROFS"):
            box.append([(ALERT, b"a")])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(read_only_disk)], check=True)
    clock.now += 60.0
    assert box.append([(ALERT, b"a")]) == [2]
    assert box.problem is None
    box.close()


@pytest.mark.integration
def test_an_agent_starts_with_its_outbox_degraded_and_reports_why(
    plane: RunningPlane, tmp_path: Path, full_disk: list[bool]
) -> None:
    state = tmp_path / "edge"
    enroll_identity(register(plane, "pump-1"), state)
    config = load_agent_config(
        None, {"state_dir": state, "assets": [{"name": "pump-1", "topics": ["p/+"]}]}
    )
    agent = Agent(config)
    try:
        problem = agent.outbox.problem
        assert problem is not None and "full (ENOSPC)" in problem, problem
        assert agent.status().health.outbox_unavailable == problem  # in every heartbeat
        assert f"outbox unavailable: {problem}" in health_problems(agent)[1]
    finally:
        agent.outbox.close()


@pytest.mark.unit
def test_a_read_only_or_full_disk_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = DiskSpace(tmp_path / "outbox.sqlite3")
    assert space.describe(OSError(errno.EROFS, "Read-only file system")).endswith("(EROFS)")
    monkeypatch.setattr(DiskSpace, "free", lambda self: 1234)
    full = space.describe(sqlite3.OperationalError("database or disk is full"))
    assert "full (ENOSPC): 1234 bytes free" in full, full
