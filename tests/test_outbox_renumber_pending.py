"""A renumbering (`Outbox.follow_plane`) that could not be written: the unsent records still
carry numbers the plane has for other records. Evicted meanwhile they are lost (counted), and
a restart does not forget that they are to be renumbered (acknowledging them away)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import LocalStateError
from edge_agent.outbox import PREDICTION, Outbox
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
