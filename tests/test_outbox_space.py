"""The outbox keeps room to work on its disk: it does not grow into the free-space reserve
(new records displace the oldest captures and predictions, counted; alerts never), its size
bound counts the pages its records really take, a full disk gives up the ballast so that
writes, acknowledgements and a checkpoint run, and it recovers by itself when space returns.

Before, an outbox whose bound (256 MiB by default) was more than its disk held filled the
disk and then failed every write, acknowledgements too, across restarts.

Most tests stand in for the disk (`DiskSpace.free`, SQLite's "database or disk is full");
`test_an_outbox_on_a_small_real_disk_never_locks_up` mounts a small tmpfs where it may
(root), and is skipped where it may not."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import LocalStateError
from edge_agent.outbox import ALERT, CAPTURE, PREDICTION, Outbox
from edge_agent.outbox_space import DiskSpace, default_reserve
from tests.support.mounts import mounted_tmpfs

pytestmark = pytest.mark.unit
MIB = 1 << 20


def kinds(box: Outbox) -> dict[int, int]:
    rows = box.pending(0, 10**7)
    return {k: sum(1 for _, kind, _ in rows if kind == k) for k in (PREDICTION, ALERT, CAPTURE)}


def page_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0]) * 4096


def test_the_default_reserve_is_2_percent_within_bounds() -> None:
    assert default_reserve(10 << 30) == (10 << 30) * 2 // 100
    assert default_reserve(1 << 30) == 64 * MIB  # the floor
    assert default_reserve(1 << 40) == 1024 * MIB  # the ceiling
    assert default_reserve(100 * MIB) == 25 * MIB  # never more than a quarter of the disk


def test_under_the_reserve_new_records_displace_the_oldest_instead_of_growing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = [1 << 40]
    monkeypatch.setattr(DiskSpace, "free", lambda self: free[0])
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 30, reserve_bytes=64 * MIB, ballast_bytes=0)
    body = b"x" * 1000
    box.append([(ALERT, b"a")] + [(CAPTURE, body)] * 10 + [(PREDICTION, body)] * 100)
    free[0] = 10 * MIB  # under the reserve, far under the outbox's own bound
    before = page_bytes(box.path)
    for _ in range(50):
        box.append([(PREDICTION, body)] * 20)
    after = kinds(box)
    assert after[ALERT] == 1 and after[CAPTURE] == 0, after  # captures went first
    assert after[PREDICTION] <= 111, after  # it took no more room than it had
    assert box.stats().evicted >= 1000 - 1, box.stats()
    grown = page_bytes(box.path) - before
    assert grown <= 64 * 1024, f"the database grew by {grown} bytes under the reserve"
    free[0] = 1 << 40  # space again: it grows again
    box.append([(PREDICTION, body)] * 20)
    assert kinds(box)[PREDICTION] == after[PREDICTION] + 20
    box.close()


def test_the_bound_counts_the_pages_the_records_take(tmp_path: Path) -> None:
    """Small records take far more room than their bytes (row and index overhead): 1-byte
    predictions within a 1 MiB bound once filled megabytes."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 * MIB, ballast_bytes=0)
    for i in range(200):
        box.append([(PREDICTION, b"p")] * 1000 + ([(ALERT, b"a")] if i == 0 else []))
    stats = box.stats()
    assert stats.bytes < 1 * MIB and stats.evicted > 0, stats
    assert page_bytes(box.path) <= 1 * MIB + 256 * 1024, page_bytes(box.path)
    assert kinds(box)[ALERT] == 1
    box.close()


class FullUntilBallastGoes:
    """Stand-in for a disk that an outside process filled: every write fails as SQLite fails
    then, until the outbox deletes its ballast (the room it gave back)."""

    def __init__(self, real: sqlite3.Connection, ballast: Path) -> None:
        self.real, self.ballast = real, ballast
        self.commits = 0

    def execute(self, sql: str, *args: Any) -> Any:
        verb = sql.lstrip().split(" ", 1)[0]
        if verb in ("INSERT", "DELETE", "UPDATE") and self.ballast.exists():
            raise sqlite3.OperationalError("database or disk is full")
        if verb == "COMMIT":
            self.commits += 1
        return self.real.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        if self.ballast.exists():
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_full_disk_gives_up_the_ballast_and_the_outbox_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = [1 << 40]
    monkeypatch.setattr(DiskSpace, "free", lambda self: free[0])
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 30, reserve_bytes=16 * MIB, ballast_bytes=MIB)
    ballast = tmp_path / "outbox.sqlite3.ballast"
    assert ballast.stat().st_size == MIB
    box.append([(PREDICTION, b"p")] * 10)
    real = box._db
    assert real is not None
    box._db = FullUntilBallastGoes(real, ballast)  # type: ignore[assignment]
    free[0] = 0
    assert box.append([(ALERT, b"a"), (PREDICTION, b"q")]) == [11, 12]
    assert not ballast.exists()
    box.ack(5)  # acknowledgements go on (predictions evicted under the reserve are gone)
    assert box.acked == 5
    box._db = real
    box.append([(PREDICTION, b"r")])
    assert not ballast.exists(), "put back before there is room for it"
    free[0] = 1 << 30  # space again: the ballast comes back at the next write
    box.append([(PREDICTION, b"s")])
    assert ballast.stat().st_size == MIB
    assert [b for _, k, b in box.pending(0, 100) if k == ALERT] == [b"a"]
    box.close()


def test_a_long_acknowledgement_goes_in_bounded_transactions(tmp_path: Path) -> None:
    """Deleting a long stretch in one transaction needs as much WAL as it deletes: on a
    full disk more than the ballast gives back."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 30, ballast_bytes=0)
    body = b"x" * 1000
    for _ in range(10):
        box.append([(PREDICTION, body)] * 1000 + [(ALERT, b"bad")])
    real = box._db
    assert real is not None
    counting = FullUntilBallastGoes(real, tmp_path / "no-ballast")
    box._db = counting  # type: ignore[assignment]
    assert box.ack(10_010, {5005: "refused"}) == 10_010
    assert counting.commits >= 4, counting.commits  # 10 MB in transactions of about 2 MiB
    assert box.quarantined() == [(5005, ALERT, b"bad", "refused")]
    assert box.stats().depth == 0 and box.acked == 10_010
    assert box.append([(PREDICTION, b"n")]) == [10_011]
    box.close()


def test_an_acknowledgement_cut_short_keeps_what_it_did(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 30, ballast_bytes=0)
    for _ in range(5):
        box.append([(PREDICTION, b"x" * 1000)] * 1000)
    real = box._db
    assert real is not None

    class FailsSecondCommit:
        commits = 0

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                self.commits += 1
                if self.commits == 2:
                    real.execute("ROLLBACK")
                    raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    box._db = FailsSecondCommit()  # type: ignore[assignment]
    with pytest.raises(LocalStateError, match="disk is full"):
        box.ack(5000)
    first = box.acked
    assert 0 < first < 5000
    box._db = real
    assert box.append([(PREDICTION, b"n")]) == [5001]  # numbers past the plane's position
    assert box.ack(5000) == 5000 - first
    assert [s for s, _, _ in box.pending(0, 10)] == [5001]
    box.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, where this process may mount one (root); skipped elsewhere."""
    with mounted_tmpfs(tmp_path / "mnt", "48m", "mounting a small file system needs root") as mnt:
        yield mnt


def fill(path: Path) -> None:
    """Fills the disk of `path` up (another process's file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)


@pytest.mark.integration
def test_an_outbox_on_a_small_real_disk_never_locks_up(small_disk: Path) -> None:
    path = small_disk / "outbox" / "outbox.sqlite3"
    reserve = 8 * MIB
    box = Outbox(path, 256 * MIB, reserve_bytes=reserve, ballast_bytes=4 * MIB)
    body = os.urandom(300)
    seqs: list[int] = []
    alerts: dict[int, bytes] = {}  # by sequence

    def write(batch: list[tuple[int, bytes]], alert: bytes | None) -> None:
        got = box.append(batch + ([(ALERT, alert)] if alert else []))
        seqs.extend(got)
        if alert:
            alerts[got[-1]] = alert

    # The outbox alone, its bound far past the disk: it stops growing at the reserve.
    for i in range(9000):  # 54 MB of records on a 48 MiB disk
        write([(PREDICTION, body)] * 20, b"alert-%d" % i if i % 500 == 0 else None)
    free = box.space.free()
    assert free >= reserve - 2 * MIB, f"{free} bytes free, reserve {reserve}"
    assert (small_disk / "outbox" / "outbox.sqlite3.ballast").exists()
    assert box.stats().evicted > 0

    # Another process fills the disk: writes, acknowledgements and a restart go on.
    fill(small_disk / "filler")
    for i in range(500):
        write([(PREDICTION, body)] * 20, b"full-%d" % i if i % 100 == 0 else None)
    assert box.ack(seqs[len(seqs) // 2]) >= 0
    box.close()
    box = Outbox(path, 256 * MIB, reserve_bytes=reserve, ballast_bytes=4 * MIB)
    write([], b"after-restart")
    kept = [b for _, k, b in box.pending(0, 10**7) if k == ALERT]
    assert kept == [a for s, a in sorted(alerts.items()) if s > box.acked], kept

    # Space returns: the ballast is put back, nothing else to do.
    (small_disk / "filler").unlink()
    box.append([(PREDICTION, body)])
    assert (small_disk / "outbox" / "outbox.sqlite3.ballast").exists()
    box.close()
