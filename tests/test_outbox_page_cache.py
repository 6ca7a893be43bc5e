"""The pages every table but the records' takes (the quarantine, the marks, the open alerts)
are counted with dbstat once and kept until one of those tables is written. Before, every
append at the bound walked the quarantine's pages under the outbox's lock (~13 ms for ~8k
pages), though eviction deletes records only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.outbox import CAPTURE, PREDICTION, Outbox

pytestmark = pytest.mark.unit
BOUND = 256 * 1024


def record_pages(path: Path) -> int:
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM dbstat WHERE name IN ('records', 'records_kind_seq')"
        ).fetchone()
    return int(row[0]) * 4096


def test_appends_at_the_bound_count_the_other_pages_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", BOUND, ballast_bytes=0)
    seqs = box.append([(CAPTURE, bytes(3000))] * 10)
    box.ack(seqs[-1], {s: "schema" for s in seqs})  # something in the quarantine
    db = box._db
    assert db is not None
    walks: list[str] = []
    db.set_trace_callback(lambda sql: walks.append(sql) if "dbstat" in sql else None)
    for _ in range(40):  # 40 x 100 x 120 B: well past the bound, evicting at every append
        box.append([(PREDICTION, b"p" * 120)] * 100, {"pump-1": 1.0})
    assert box.stats().evicted > 0, box.stats()
    counted = len(walks)
    assert counted, "the other pages were never counted"
    for _ in range(10):
        box.append([(PREDICTION, b"p" * 120)] * 100, {"pump-1": 2.0})
    assert len(walks) == counted, f"{len(walks) - counted} dbstat queries in 10 appends"

    # An acknowledgement that quarantines changes them: counted again once at the bound.
    seqs = box.append([(CAPTURE, bytes(3000))] * 10)
    box.ack(seqs[-1], {s: "schema" for s in seqs})  # everything up to them goes
    counted = len(walks)
    for _ in range(30):
        box.append([(PREDICTION, b"p" * 120)] * 100)
    assert len(walks) > counted, "the cached count was not refreshed after the quarantine grew"
    counted = len(walks)
    box.append([(PREDICTION, b"p" * 120)] * 100, None, {"pump-1": '{"open": 1}'})
    assert len(walks) > counted, "not refreshed after an open alert was written"
    counted = len(walks)
    box.append([(PREDICTION, b"p" * 120)] * 100, {"pump-2": 1.0})
    assert len(walks) > counted, "not refreshed after a new scoring mark"
    db.set_trace_callback(None)
    pages = record_pages(box.path)
    assert pages <= BOUND, f"the records take {pages} bytes of pages for a {BOUND}-byte bound"
    box.close()
