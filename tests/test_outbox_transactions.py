"""A write that fails with something other than an SQLite error (a bug in what it was given)
rolls its transaction back and raises: the outbox takes the next write, nothing half-kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.outbox import PREDICTION, Outbox

pytestmark = pytest.mark.unit


class Broken(dict[str, float]):
    """Marks (or rejections) whose reading fails half-way through a transaction."""

    def items(self) -> object:  # type: ignore[override]
        raise RuntimeError("broken marks")


def test_a_failed_append_rolls_back_and_the_next_one_is_kept(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    with pytest.raises(RuntimeError, match="broken marks"):
        outbox.append([(PREDICTION, b"lost")], Broken(x=1.0))
    assert outbox.append([(PREDICTION, b"kept")], {"pump-1": 5.0}) == [1]
    assert [body for _, _, body in outbox.pending(0, 10)] == [b"kept"]
    assert outbox.scored_through() == {"pump-1": 5.0}


def test_a_failed_ack_rolls_back_and_the_next_one_is_done(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    outbox.append([(PREDICTION, b"a"), (PREDICTION, b"b")])
    with pytest.raises(RuntimeError, match="broken marks"):
        outbox.ack(1, Broken(x=1.0))  # type: ignore[arg-type]
    assert outbox.ack(1) == 1
    assert outbox.append([(PREDICTION, b"c")]) == [3]
    assert [body for _, _, body in outbox.pending(0, 10)] == [b"b", b"c"]
