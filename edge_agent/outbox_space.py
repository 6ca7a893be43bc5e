"""The outbox's room on its file system: a free-space reserve it does not grow into, and a
ballast file given up when SQLite finds the disk full, so that acknowledgements, eviction and
a WAL checkpoint (which all need some space to write) can still run and free the disk.

Without them an outbox that filled its own disk locked up for good: every write failed,
the DELETE of an acknowledgement too (a WAL frame to write), and a restart did not help.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1 << 20
RESERVE_FLOOR = 64 * MIB  # the default reserve: 2 % of the file system within these bounds
RESERVE_CEILING = 1024 * MIB
RESERVE_SHARE = 0.02
RESERVE_MAX_SHARE = 0.25  # never more of a small file system than this
BALLAST_BYTES = 8 * MIB
_SQLITE_FULL = 13
_SQLITE_READONLY = 8
# The I/O errors a full disk gives where SQLite grows its WAL, syncs or maps its shared
# memory (IOERR_WRITE, _FSYNC, _TRUNCATE, _SHMSIZE); a failing card gives them too (EIO).
_SQLITE_IOERR_SPACE = (778, 1034, 1546, 4874)
NEARLY_FULL = MIB  # free bytes under which those I/O errors are taken as a full disk
_EVICT_CHUNK = 256


def default_reserve(total_bytes: int) -> int:
    """2 % of a file system of `total_bytes`, at least 64 MiB and at most 1 GiB, but never
    more than a quarter of it (a small SD card)."""
    share = min(max(int(total_bytes * RESERVE_SHARE), RESERVE_FLOOR), RESERVE_CEILING)
    return min(share, int(total_bytes * RESERVE_MAX_SHARE))


def is_full(exc: sqlite3.Error | OSError, free: int | None = None) -> bool:
    """SQLite's "database or disk is full", or ENOSPC; with `free` (the bytes free on the
    disk), also the I/O errors a full disk gives where SQLite grows its WAL or shared memory,
    when the disk is nearly full. Not every I/O error: one from a failing card (EIO) is no
    reason to give up the ballast, and did so at every write."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code & 0xFF == _SQLITE_FULL:
            return True
        if code in _SQLITE_IOERR_SPACE and free is not None and free < NEARLY_FULL:
            return True
    return "disk is full" in str(exc)


class DiskSpace:
    """Free space on the file system of `path` (the outbox database), its reserve, and the
    ballast file next to it (`<path>.ballast`). Asked at every write: statvfs is a cheap
    system call, and a cached figure let a fast writer run past the reserve."""

    def __init__(
        self, path: Path, reserve_bytes: int | None = None, ballast_bytes: int = BALLAST_BYTES
    ) -> None:
        self.path = path
        self.ballast = path.with_name(path.name + ".ballast")
        self.ballast_bytes = ballast_bytes
        self._reserve = reserve_bytes
        self._total = 0
        self._readonly = False

    def free(self) -> int:
        """Bytes free to this process on the file system (0 when it cannot be asked)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:  # no such directory yet, or gone: nothing to say
            return 0
        self._total = st.f_blocks * st.f_frsize
        self._readonly = bool(st.f_flag & os.ST_RDONLY)
        return st.f_bavail * st.f_frsize

    @property
    def reserve(self) -> int:
        if self._reserve is not None:
            return self._reserve
        if not self._total:
            self.free()
        return default_reserve(self._total)

    def short(self) -> bool:
        """Free space is under the reserve: the outbox must not grow (new records displace
        the oldest captures and predictions)."""
        return self.free() < self.reserve

    def is_full(self, exc: sqlite3.Error | OSError) -> bool:
        """`is_full`, asking this disk for its free space."""
        return is_full(exc, self.free())

    def release_ballast(self) -> bool:
        """Deletes the ballast (SQLite found the disk full): True when there was one."""
        try:
            self.ballast.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("cannot delete the outbox's ballast %s: %s", self.ballast, exc)
            return False
        log.warning(
            "the disk of the outbox is full: its %d-byte ballast %s was deleted so that "
            "acknowledgements and eviction can run; it is put back once space returns",
            self.ballast_bytes,
            self.ballast,
        )
        return True

    def restore_ballast(self) -> None:
        """Puts the ballast (back) when it is missing and the disk has room for it twice and
        half the reserve (an outbox that stopped growing at the reserve gets it back); a
        failure leaves it missing (tried again later). Twice: given up on a full disk, it
        had freed just its own size, and putting it back at once filled the disk again (with
        no reserve, 14 times in 20 writes)."""
        if not self.ballast_bytes or self.ballast.exists():
            return
        if self.free() < 2 * self.ballast_bytes + self.reserve // 2:
            return
        partial = self.ballast.with_name(self.ballast.name + ".part")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.ballast_bytes)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, self.ballast)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            log.warning("cannot put the outbox's ballast %s: %s", self.ballast, exc)

    def describe(self, exc: BaseException | None = None) -> str:
        """What the file system says about a failure: full (ENOSPC) or read-only (EROFS),
        with the free bytes; '' when neither."""
        free = self.free()
        code = getattr(exc, "errno", None)
        sqlite_code = getattr(exc, "sqlite_errorcode", None)
        readonly = self._readonly or code == errno.EROFS
        if isinstance(sqlite_code, int) and sqlite_code & 0xFF == _SQLITE_READONLY:
            readonly = readonly or not os.access(self.path.parent, os.W_OK)
        if readonly:
            return f"the file system of {self.path.parent} is read-only (EROFS)"
        full = code == errno.ENOSPC or (isinstance(exc, sqlite3.Error) and is_full(exc, free))
        if full or free < self.ballast_bytes:
            of = f" of {self._total}" if self._total else ""
            return f"the disk of {self.path.parent} is full (ENOSPC): {free} bytes free{of}"
        return ""


def has_dbstat(db: sqlite3.Connection) -> bool:
    """Whether this SQLite has the dbstat table (the pages each table takes)."""
    try:
        db.execute("SELECT 1 FROM dbstat LIMIT 0")
    except sqlite3.Error:
        return False
    return True


def _pages(db: sqlite3.Connection) -> tuple[int, int]:
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    return int(pages - free), int(size)


def other_pages(db: sqlite3.Connection, evictable: Sequence[str], baseline: int | None) -> int:
    """The pages of every table and index but the `evictable` ones (the schema's too).
    With dbstat (`baseline` None): exact, by name, so dbstat walks only those (the quarantine,
    the marks, the open alerts, meta). Without it (embedded SQLite builds may lack it): a
    lower bound, the `baseline` pages of the empty schema and the pages the quarantine's
    bodies fill at least, so that the pages past it still bound the records' from above."""
    if baseline is not None:
        size = int(db.execute("PRAGMA page_size").fetchone()[0])
        held = db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM quarantine").fetchone()[0]
        return baseline + int(held) // size
    names = ["sqlite_schema"] + [
        str(n)
        for (n,) in db.execute("SELECT name FROM sqlite_master WHERE rootpage > 0")
        if n not in evictable
    ]
    return sum(
        int(db.execute("SELECT COUNT(*) FROM dbstat WHERE name = ?", (name,)).fetchone()[0])
        for name in names
    )


EVICTABLE = ("records", "records_kind_seq")  # what eviction frees: the records and their index


def evict_oldest(
    db: sqlite3.Connection,
    order: Sequence[int],
    total: int,
    limit: int,
    bound: tuple[int, int] | None,
    path: Path,
    below: int | None = None,
    known: int = 0,
    others: Callable[[], int] | None = None,
) -> tuple[int, int, int]:
    """Deletes the oldest records of the kinds in `order` (all of the first kind first)
    until `total` record bytes fit in `limit` and, with `bound` (max_bytes, the pages every
    other table and index takes when empty), the pages the records and their index take fit
    in max_bytes: all the pages past `others()` (`other_pages`: exact with dbstat, a lower
    bound without). Only what eviction can free counts: the quarantine, the scoring marks and
    the open alerts take pages too, and counting them evicted every new record unsent.
    Records numbered `below` or higher (this transaction's) are never evicted. Returns
    (records, bytes) deleted and the records lost: those numbered past `known`, the highest
    number the control plane acknowledged (it has the others)."""
    evicted = freed = lost = 0
    other: int | None = None
    while True:
        excess = total - freed - limit
        if bound is not None:
            used, size = _pages(db)
            if (used - bound[1]) * size > bound[0]:  # all pages past the schema: an upper bound
                if other is None:  # eviction deletes records only: the rest stays as it is
                    other = others() if others is not None else bound[1]
                excess = max(excess, (used - other) * size - bound[0])
        if excess <= 0:
            break
        victims = []
        for kind in order:
            victims = db.execute(
                "SELECT seq, LENGTH(body) FROM records WHERE kind = ? AND seq < ? "
                "ORDER BY seq LIMIT ?",
                (kind, below if below is not None else 1 << 62, _EVICT_CHUNK),
            ).fetchall()
            if victims:
                break
        if not victims:
            if bound is not None:
                log.warning(
                    "outbox %s holds %d bytes of alert events and records being written, over "
                    "its %d-byte bound; alert events are never evicted",
                    path,
                    total - freed,
                    bound[0],
                )
            break
        take = []
        for seq, size in victims:
            take.append((seq,))
            freed += size
            evicted += 1
            lost += seq > known
            excess -= size
            if excess <= 0:
                break
        db.executemany("DELETE FROM records WHERE seq = ?", take)
    return evicted, freed, lost
