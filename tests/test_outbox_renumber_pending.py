"""A renumbering (`Outbox.follow_plane`) that could not be written: the unsent records still
carry numbers the plane has for other records. Evicted meanwhile they are lost (counted), and
a restart does not forget that they are to be renumbered (acknowledging them away)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent.errors import LocalStateError
from edge_agent.outbox import PREDICTION, Outbox
from edge_agent.sync import RecordSync
from tests.test_outbox_renumber import RenumberFails

MIB = 1 << 20


def _records(n: int, tag: bytes, size: int = 2000) -> list[tuple[int, bytes]]:
    return [(PREDICTION, tag + b"%d " % i + b"x" * size) for i in range(n)]


def _failing(box: Outbox) -> object:
    real = box._db
    assert real is not None
    box._db = RenumberFails(real)  # type: ignore[assignment]
    return real


@pytest.mark.unit
def test_records_evicted_while_their_renumbering_is_pending_are_counted_lost(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 64 * MIB, ballast_bytes=0)
    box.append(_records(40, b"old"))  # 1..40, never sent; the plane has 1..50 from elsewhere
    real = _failing(box)
    with pytest.raises(LocalStateError):
        box.follow_plane(50)
    box._db = real  # type: ignore[assignment]
    box.max_bytes = 40 * 1024  # the bound shrinks: the oldest go
    box.append(_records(1, b"new"))
    stats = box.stats()
    evicted = 41 - stats.depth
    assert evicted > 0, stats
    assert stats.evicted == evicted, f"{evicted} unsent record(s) evicted, counted {stats}"
    box.close()


@pytest.mark.unit
def test_a_restart_while_a_renumbering_is_pending_finishes_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 64 * MIB, ballast_bytes=0)
    old = _records(40, b"old", 10)
    box.append(old)  # 1..40, never sent; the plane has 1..50 from elsewhere
    _failing(box)
    with pytest.raises(LocalStateError):
        box.follow_plane(50)
    box.close()

    again = Outbox(path, 64 * MIB, ballast_bytes=0)
    new = _records(20, b"new", 10)
    assert again.append(new) == list(range(41, 61))  # past the plane's 50
    sync = RecordSync(again, 1000, 4)
    asyncio.run(sync.on_accepted(50))  # the next session: the plane has not moved
    pending = again.pending(0, 100)
    assert [body for _, _, body in pending] == [b for _, b in old + new], "acknowledged away"
    assert [seq for seq, _, _ in pending] == list(range(61, 121))
    assert (again.acked, again.stats().next_sequence) == (50, 121)
    again.close()

    third = Outbox(path, 64 * MIB)  # done: nothing moves again
    asyncio.run(RecordSync(third, 1000, 4).on_accepted(50))
    assert [seq for seq, _, _ in third.pending(0, 100)] == list(range(61, 121))
    third.close()


@pytest.mark.unit
def test_an_acknowledgement_after_a_restart_does_not_delete_records_pending_renumbering(
    tmp_path: Path,
) -> None:
    """Whatever calls first after the restart (an acknowledgement retried), the renumbering
    is done before anything is deleted."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 64 * MIB, ballast_bytes=0)
    box.append(_records(40, b"old", 10))
    _failing(box)
    with pytest.raises(LocalStateError):
        box.follow_plane(50)
    box.close()

    again = Outbox(path, 64 * MIB, ballast_bytes=0)
    again.ack(50)
    assert [seq for seq, _, _ in again.pending(0, 100)] == list(range(51, 91))
    again.close()
