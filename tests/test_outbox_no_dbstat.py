"""Without dbstat (embedded SQLite builds, Yocto or Buildroot, may lack it) the outbox's
bound still holds in pages: the pages past the empty schema, less those the quarantine's
bodies fill at least, bound the records' from above. Before, the fallback counted record
bytes only, and the records took 22 % more pages than the bound (1,282,048 bytes of pages
for a 1 MiB bound with 120-byte predictions)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.outbox import CAPTURE, PREDICTION, Outbox

pytestmark = pytest.mark.unit
MIB = 1 << 20


@pytest.fixture(autouse=True)
def no_dbstat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edge_agent.outbox.has_dbstat", lambda db: False)


def record_pages(path: Path) -> int:
    """The bytes of the pages the records and their index take (this test's SQLite has
    dbstat: the outbox is only told it has not)."""
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM dbstat WHERE name IN ('records', 'records_kind_seq')"
        ).fetchone()
        size = db.execute("PRAGMA page_size").fetchone()[0]
    return int(row[0]) * int(size)


def test_the_bound_holds_in_pages_without_dbstat(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1 * MIB, ballast_bytes=0)
    for _ in range(120):  # 12,000 x 120 B: 1.44 MB of bodies into a 1 MiB bound
        box.append([(PREDICTION, b"p" * 120)] * 100)
    stats = box.stats()
    assert stats.evicted > 0, stats
    pages = record_pages(box.path)
    assert pages <= MIB, f"the records take {pages} bytes of pages for a {MIB}-byte bound"
    assert pages >= MIB * 9 // 10, f"the records take {pages} bytes of pages: evicted too many"
    box.close()


def test_a_full_quarantine_does_not_evict_new_records_without_dbstat(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1 * MIB, ballast_bytes=0)
    for _ in range(20):  # refused captures fill the quarantine: its bound, max_bytes / 8
        seqs = box.append([(CAPTURE, bytes(3000))] * 100)
        box.ack(seqs[-1], {s: "schema" for s in seqs})
    old = box.append([(PREDICTION, b"o" * 120)] * 100)
    new = box.append([(PREDICTION, b"n" * 120)] * 100)
    assert [s for s, _, _ in box.pending(0, 1000)] == old + new
    assert box.stats().evicted == 0, box.stats()
    box.close()
