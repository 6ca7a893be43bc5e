"""A damaged outbox database is moved aside (kept, named in the log) and a new one started
with what could still be read from it. Before, an outbox failing SQLite's quick_check (or not
a database at all) left the agent degraded, retrying for ever, until an operator moved the
file by hand, and the new file lost the numbering, the open alerts and the scoring marks."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent import outbox_files
from edge_agent.outbox import PREDICTION, Outbox

pytestmark = pytest.mark.unit
MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _written(path: Path) -> None:
    """300 records, the first 100 acknowledged, an open alert and a scoring mark."""
    box = Outbox(path, 16 * MIB, ballast_bytes=0)
    box.append([(PREDICTION, b"r%d" % i) for i in range(1, 301)], {"pump-1": 7.0})
    box.append([(PREDICTION, b"r301")], open_alerts={"pump-1": '{"open": 1}'})
    box.ack(100)
    box.close()


def _damage_index(path: Path) -> None:
    """Garbage over the root page of the records' index: quick_check fails, the records'
    own pages stay readable."""
    with sqlite3.connect(path) as db:
        root = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'records_kind_seq'"
        ).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)


def _kept(path: Path) -> list[Path]:
    """The damaged databases moved aside (not their WAL or shared memory)."""
    found = path.parent.glob(path.name + ".damaged-*")
    return sorted(p for p in found if not p.name.endswith(("-wal", "-shm")))


def test_a_damaged_outbox_is_moved_aside_and_what_it_still_says_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    _written(path)
    _damage_index(path)
    with pytest.raises(outbox_files.DamagedDatabase):
        outbox_files.open_database(path)
    damaged = path.read_bytes()

    caplog.set_level(logging.ERROR, "edge_agent.outbox_salvage")
    box = Outbox(path, 16 * MIB, ballast_bytes=0, degraded_ok=True)
    assert box.problem is None, box.problem  # not degraded
    (kept,) = _kept(path)
    assert kept.read_bytes() == damaged, "the damaged file is not kept as it was"
    stats = box.stats()
    assert (stats.depth, stats.acked, stats.next_sequence) == (201, 100, 302), stats
    rows = box.pending(100, 1000)
    assert [s for s, _, _ in rows] == list(range(101, 302))
    assert [b for _, _, b in rows] == [b"r%d" % i for i in range(101, 302)]
    assert box.open_alert_events() == {"pump-1": '{"open": 1}'}
    assert box.scored_through() == {"pump-1": 7.0}
    assert box.append([(PREDICTION, b"next")]) == [302]  # numbering goes on
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "damaged" in error and str(kept) in error and "201 of its 201 record(s)" in error
    box.close()
    assert outbox_files.open_database(path).close() is None  # sound


def test_a_file_that_is_not_a_database_is_moved_aside_and_a_new_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"not an outbox\n" * 1000)
    caplog.set_level(logging.ERROR, "edge_agent.outbox_salvage")
    box = Outbox(path, 16 * MIB, ballast_bytes=0)
    (kept,) = _kept(path)
    assert kept.read_bytes() == b"not an outbox\n" * 1000
    assert box.append([(PREDICTION, b"p")]) == [1]  # renumbered at the next session
    assert any("nothing could be read" in r.getMessage() for r in caplog.records)
    box.close()


def test_a_new_outbox_that_cannot_be_made_leaves_the_damaged_one_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk on which the new file is damaged too: the outbox runs degraded, as before, with
    the old file back in place (no copies piling up at each retry), and opens it once it can."""
    path = tmp_path / "outbox.sqlite3"
    _written(path)
    before = path.read_bytes()
    real_open = outbox_files.open_database

    def damaged(at: Path) -> sqlite3.Connection:
        real_open(at).close()  # made, as a real open would
        raise outbox_files.DamagedDatabase(f"{at}: the outbox database is damaged: test")

    monkeypatch.setattr(outbox_files, "open_database", damaged)
    clock = Clock()
    box = Outbox(path, 16 * MIB, ballast_bytes=0, degraded_ok=True, retry_s=30.0, clock=clock)
    assert box.problem is not None and "a new outbox started" in box.problem, box.problem
    clock.now += 60
    assert box.pending(0, 10) == []  # retried: the same again
    assert _kept(path) == [] and path.read_bytes() == before
    monkeypatch.setattr(outbox_files, "open_database", real_open)
    clock.now += 60
    assert len(box.pending(0, 1000)) == 201 and box.problem is None
    box.close()
