"""The outbox's acknowledgement path in SQL: where the next acknowledging transaction ends,
deleting what the control plane stored and moving what it refused into the quarantine,
keeping the quarantine bounded, and renumbering the unsent records of an outbox the control
plane is ahead of. Functions on the caller's connection, in its transaction; the counters
and the meta table stay with `Outbox`."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

QUARANTINE_KEEP = 10_000  # newest refused records kept for inspection
QUARANTINE_SHARE = 8  # and in at most max_bytes / this of their bodies
ACK_CHUNK_BYTES = 2 << 20  # records deleted per acknowledging transaction, about
ACK_CHUNK_ROWS = 20_000
log = logging.getLogger("edge_agent.outbox")  # its warnings are the outbox's
# meta key: the plane's position a renumbering (`Outbox.follow_plane`) is to follow, kept
# until the renumbering is written, so a restart meanwhile finishes it
PLANE_AHEAD = "plane_ahead"


@dataclass(frozen=True)
class Acknowledged:
    """What one acknowledging transaction did."""

    quarantined: int  # refused records moved to the quarantine
    freed: int  # bytes of the records deleted
    deleted: int


def chunk_end(db: sqlite3.Connection, acked: int, up_to: int) -> int:
    """The sequence the next acknowledging transaction after `acked` goes to (at most
    `up_to`): about ACK_CHUNK_BYTES of records, at most ACK_CHUNK_ROWS."""
    rows = db.execute(
        "SELECT seq, LENGTH(body) FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        (acked, up_to, ACK_CHUNK_ROWS),
    ).fetchall()
    size = 0
    for seq, length in rows:
        size += length
        if size >= ACK_CHUNK_BYTES:
            return int(seq)
    return up_to if len(rows) < ACK_CHUNK_ROWS else int(rows[-1][0])


def acknowledge(
    db: sqlite3.Connection, acked: int, end: int, rejected: Mapping[int, str], max_bytes: int
) -> Acknowledged:
    """Deletes the records up to `end`; those of `rejected` (sequence -> the control plane's
    reason) numbered after `acked` go to the quarantine first (bounded: `trim_quarantine`)."""
    moved = 0
    for seq, reason in sorted(rejected.items()):
        if acked < seq <= end:
            moved += db.execute(
                "INSERT OR REPLACE INTO quarantine (seq, kind, body, reason) "
                "SELECT seq, kind, body, ? FROM records WHERE seq = ?",
                (reason, seq),
            ).rowcount
    if moved:
        trim_quarantine(db, max_bytes)
    freed, deleted = db.execute(
        "SELECT COALESCE(SUM(LENGTH(body)), 0), COUNT(*) FROM records WHERE seq <= ?", (end,)
    ).fetchone()
    db.execute("DELETE FROM records WHERE seq <= ?", (end,))
    return Acknowledged(moved, int(freed), int(deleted))


def trim_quarantine(db: sqlite3.Connection, max_bytes: int) -> None:
    """Keeps the newest QUARANTINE_KEEP refused records within max_bytes/QUARANTINE_SHARE
    of bodies: the quarantine's pages are not the records' (nothing evicts them), so a
    plane refusing everything would otherwise keep megabytes the disk needs."""
    db.execute(
        "DELETE FROM quarantine WHERE seq NOT IN "
        "(SELECT seq FROM quarantine ORDER BY seq DESC LIMIT ?)",
        (QUARANTINE_KEEP,),
    )
    over = db.execute(
        "SELECT MAX(seq) FROM (SELECT seq, SUM(LENGTH(body)) OVER (ORDER BY seq DESC) AS kept "
        "FROM quarantine) WHERE kept > ?",
        (max_bytes // QUARANTINE_SHARE,),
    ).fetchone()[0]
    if over is not None:
        db.execute("DELETE FROM quarantine WHERE seq <= ?", (over,))


@dataclass(frozen=True)
class Renumbered:
    """The unsent records `renumber` moved: how many, their first and last old numbers."""

    count: int
    first: int
    last: int
    shift: int

    def __str__(self) -> str:
        if not self.count:
            return "no unsent record to renumber"
        new = f"{self.first + self.shift}..{self.last + self.shift}"
        return f"{self.count} unsent record(s) {self.first}..{self.last} renumbered {new}"


def renumber(db: sqlite3.Connection, acked: int, shift: int) -> Renumbered:
    """Adds `shift` to the numbers of the records after `acked`, keeping their order. One
    UPDATE: the caller's `shift` puts every new number above every old one, so none meets a
    number still in use while it runs."""
    count, first, last = db.execute(
        "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM records WHERE seq > ?",
        (acked,),
    ).fetchone()
    db.execute("UPDATE records SET seq = seq + ? WHERE seq > ?", (shift, acked))
    db.execute("DELETE FROM meta WHERE key = ?", (PLANE_AHEAD,))
    return Renumbered(int(count), int(first), int(last), shift)


def log_renumbered(
    path: Path, last_stored: int, numbered: int, acked: int, done: Renumbered
) -> None:
    log.warning(
        "%s: the control plane stored this device's records up to %d, and this outbox "
        "(numbered up to %d, acknowledged up to %d) was replaced or restored from a "
        "backup: %s, to be sent (from a backup, those the plane stored already are "
        "stored twice: it tells records apart by number only)",
        path,
        last_stored,
        numbered,
        acked,
        done,
    )


def quarantined(db: sqlite3.Connection, limit: int) -> list[tuple[int, int, bytes, str]]:
    """The newest refused records: (seq, kind, body, reason)."""
    return db.execute(
        "SELECT seq, kind, body, reason FROM quarantine ORDER BY seq DESC LIMIT ?", (limit,)
    ).fetchall()
