"""The outbox's size bound counts only what eviction can free (the records and their index):
the quarantine, the scoring marks and the open alerts take pages too, but nothing evicts
them, and counting them made every append evict the records it had just written, unsent.
The quarantine is bounded in bytes itself (max_bytes / QUARANTINE_SHARE, oldest first)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.outbox import CAPTURE, PREDICTION, QUARANTINE_SHARE, Outbox

pytestmark = pytest.mark.unit
MIB = 1 << 20


def quarantine_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM quarantine").fetchone()
        return int(row[0])


def test_a_full_quarantine_does_not_make_appends_evict_new_records(tmp_path: Path) -> None:
    """The plane refuses every capture: the refused ones fill the quarantine past the bound;
    new records are kept and sent, not evicted as they are written."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 * MIB, ballast_bytes=0)
    for _ in range(20):  # 20 x 100 x 3000 B refused: 6 MB, six times the bound
        seqs = box.append([(CAPTURE, bytes(3000))] * 100)
        box.ack(seqs[-1], {s: "schema" for s in seqs})
    stats = box.stats()
    assert stats.evicted == 0 and stats.quarantined == 2000, stats
    kept = quarantine_bytes(box.path)
    assert 0 < kept <= MIB // QUARANTINE_SHARE, f"the quarantine keeps {kept} bytes"
    seqs = box.append([(PREDICTION, b"p" * 200)] * 10)
    assert [s for s, _, _ in box.pending(0, 100)] == seqs
    assert box.stats().evicted == 0, box.stats()
    box.close()


def test_an_append_over_the_bound_keeps_its_own_records(tmp_path: Path) -> None:
    """One append larger than the bound evicts the older records, never its own."""
    box = Outbox(tmp_path / "outbox.sqlite3", 64 * 1024, ballast_bytes=0)
    old = box.append([(PREDICTION, b"o" * 1000)] * 10)
    new = box.append([(PREDICTION, b"n" * 1000)] * 100)  # 100 kB into a 64 kB bound
    assert [s for s, _, _ in box.pending(0, 1000)] == new
    assert box.stats().evicted == len(old), box.stats()
    box.close()
