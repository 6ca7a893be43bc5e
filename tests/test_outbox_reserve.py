"""Under the free-space reserve the outbox does not grow its file, and no more than that:
new records go into the free pages and the room left in the last ones first, and only what
would grow the file displaces the oldest records. Before, every append evicted its own
weight of the oldest records: a device waiting for its link kept one record, and records
acknowledged by the control plane were counted as lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import LocalStateError
from edge_agent.outbox import PREDICTION, Outbox

pytestmark = pytest.mark.unit
FAR_PAST = 1 << 50  # a reserve larger than any free space: the disk is short


def test_a_waiting_outbox_under_the_reserve_keeps_what_fits_in_its_pages(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, reserve_bytes=FAR_PAST, ballast_bytes=0)
    seqs = [s for _ in range(10) for s in box.append([(PREDICTION, b"p" * 200)])]
    assert [s for s, _, _ in box.pending(0, 100)] == seqs
    assert box.stats().evicted == 0, box.stats()
    box.close()


def test_free_pages_take_new_records_without_evicting(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    box.append([(PREDICTION, b"p" * 200)] * 500)
    box.ack(490)  # 10 in flight; the acknowledged ones left free pages
    box.space._reserve = FAR_PAST
    new = box.append([(PREDICTION, b"q" * 200)] * 10)
    assert [s for s, _, _ in box.pending(0, 100)] == list(range(491, 501)) + new
    assert box.stats().evicted == 0, box.stats()
    box.close()


def test_the_file_does_not_grow_under_the_reserve(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, reserve_bytes=FAR_PAST, ballast_bytes=0)
    box.append([(PREDICTION, b"x" * 1000)] * 200)
    assert box._db is not None
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    for _ in range(50):
        box.append([(PREDICTION, b"y" * 1000)] * 20)
    grown = box._db.execute("PRAGMA page_count").fetchone()[0] - pages
    assert grown <= 0, f"the file grew by {grown} pages under the reserve"
    assert box.stats().evicted >= 800, box.stats()  # 1000 written into room for about 200
    box.close()


def test_records_the_plane_acknowledged_are_not_counted_as_lost(tmp_path: Path) -> None:
    """The acknowledgement could not be written (the disk is full): evicting what it covers
    loses nothing, the plane has it."""
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    box.append([(PREDICTION, b"x" * 1000)] * 100)
    real = box._transaction

    def full(body: object, what: str) -> None:
        raise LocalStateError("disk full (stand-in)")

    box._transaction = full  # type: ignore[method-assign,assignment]
    with pytest.raises(LocalStateError):
        box.ack(50)
    box._transaction = real  # type: ignore[method-assign]
    box.space._reserve = FAR_PAST
    box.append([(PREDICTION, b"y" * 1000)] * 20)
    stats = box.stats()
    first = box.pending(0, 1)[0][0]
    assert 1 < first <= 51 and stats.evicted == 0, (first, stats)
    box.close()
