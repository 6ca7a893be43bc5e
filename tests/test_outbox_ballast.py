"""The outbox's ballast is given up on a full disk only (SQLITE_FULL, ENOSPC, or the I/O
errors a full disk gives when the disk is nearly full), and put back only when the disk has
room for it twice and half the reserve. Before, it came back as soon as it fitted, filling
the disk again at once (with no reserve, deleted 14 times in 20 writes), and every I/O error
of a failing card (EIO) gave it up."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.outbox_space import DiskSpace, is_full

pytestmark = pytest.mark.unit
MIB = 1 << 20


def sqlite_error(code: int) -> sqlite3.Error:
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


def test_a_ballast_given_up_on_a_full_disk_is_not_put_back_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = DiskSpace(tmp_path / "outbox.sqlite3", reserve_bytes=0, ballast_bytes=MIB)
    others = [1 << 40]  # free bytes with the ballast in place

    def free(self: DiskSpace) -> int:
        return others[0] + (0 if self.ballast.exists() else self.ballast_bytes)

    monkeypatch.setattr(DiskSpace, "free", free)
    space.restore_ballast()
    assert space.ballast.exists()
    others[0] = 0  # another process filled the disk
    released = 0
    for _ in range(20):  # each write: full, the ballast goes, then the outbox tries it back
        if space.is_full(sqlite3.OperationalError("database or disk is full")):
            released += space.release_ballast()
        space.restore_ballast()
    assert released == 1, f"the ballast was given up {released} times"
    others[0] = 2 * MIB  # room for it twice: back
    space.restore_ballast()
    assert space.ballast.exists()


def test_only_a_full_disk_counts_as_full() -> None:
    assert is_full(sqlite3.OperationalError("database or disk is full"))
    assert is_full(sqlite_error(13))  # SQLITE_FULL
    assert is_full(OSError(28, "No space left on device"))
    assert is_full(sqlite_error(4874), free=0)  # IOERR_SHMSIZE on a full disk
    assert not is_full(sqlite_error(778), free=10 * MIB)  # IOERR_WRITE: EIO, room enough
    assert not is_full(sqlite_error(266), free=0)  # IOERR_READ: never a full disk
    assert not is_full(sqlite_error(10))  # a plain I/O error
