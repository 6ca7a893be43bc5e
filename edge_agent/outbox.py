"""The outbox: predictions, alert events and window captures waiting for the control plane,
in SQLite (WAL), with the alerts open on site committed in the same transactions.

Every record gets the next sequence number when it is written; the control plane stores each
(device, sequence) once and acknowledges "everything up to N", after which those rows go
(the refused ones into a bounded quarantine: `outbox_acks.py`). An outbox the plane is ahead
of (a new file, a backup) renumbers its unsent records after the plane's numbers
(`follow_plane`) rather than acknowledge them away.
The outbox is bounded in bytes (its records' and the pages they really take): past the bound
the oldest window captures are evicted first, then the oldest predictions (counted); alert
events never are. Under the free-space reserve of its file system it does not grow: new
records go into its free pages, and what would grow the file displaces the oldest captures
and predictions the same way (`outbox_space.py`).
Writes are committed with synchronous=FULL, so a record that was appended survives kill -9
and power loss.

The alerts open on each asset (`open_alerts`, `outbox_alerts.py`) and where scoring got to
(`scored`) are kept with the records that changed them, so after a kill the three always
agree: an alert event the control plane will get is open here, and one it will never get is not.

A damaged database is moved aside (kept) and a new one started with what it still says
(`outbox_salvage.py`). An outbox that cannot be opened at start (a full or read-only disk)
can run degraded (`degraded_ok`): it takes nothing (writes raise LocalStateError, which the
sink handles as a full disk), says why in `problem`, and tries to open again every `retry_s`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edge_agent import outbox_acks, outbox_files, outbox_salvage
from edge_agent.errors import LocalStateError
from edge_agent.outbox_acks import QUARANTINE_SHARE as QUARANTINE_SHARE  # re-exported
from edge_agent.outbox_alerts import OpenAlertTable
from edge_agent.outbox_space import (
    BALLAST_BYTES,
    EVICTABLE,
    DiskSpace,
    evict_oldest,
    has_dbstat,
    other_pages,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PREDICTION = 1
ALERT = 2
CAPTURE = 3
EVICTION_ORDER = (CAPTURE, PREDICTION)  # what goes first under disk pressure; alerts never
RETRY_OPEN_S = 30.0
_DISPLACE_TRIES = 4  # evictions tried before an insert under the reserve grows the file anyway
_INSERT = "INSERT INTO records (seq, kind, body) VALUES (?, ?, ?)"


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    next_sequence: int
    acked: int
    evicted: int
    quarantined: int = 0  # records the control plane refused, ever (the newest are kept)
    disk_bytes: int = 0  # the database and its WAL on disk


class Outbox:
    """Thread-safe: the inference thread appends, the session's sync reads and acknowledges."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        reserve_bytes: int | None = None,
        ballast_bytes: int = BALLAST_BYTES,
        degraded_ok: bool = False,
        retry_s: float = RETRY_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.space = DiskSpace(path, reserve_bytes, ballast_bytes)
        self.retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._db: sqlite3.Connection | None = None
        self.problem: str | None = None  # why the outbox takes nothing now (degraded)
        self._retry_at = 0.0
        self._alerts = OpenAlertTable()
        self._scored: dict[str, float] = {}  # read at start when degraded
        self._next, self._acked, self._evicted, self._quarantined = 1, 0, 0, 0
        self._depth = self._bytes = self._baseline = 0
        self._dbstat = False  # whether this SQLite has dbstat (the pages each table takes)
        # The pages every table but the records' takes (`other_pages`), kept: walking the
        # quarantine's pages at every append at the bound took ~13 ms (8k pages) under the
        # lock. Forgotten (None) when they change: a quarantine, open alerts or marks written.
        self._others: int | None = None
        self._marked: set[str] = set()  # the assets with a scoring mark in the table
        self._known = 0  # the highest number the plane acknowledged, written or not
        # The plane's position a renumbering (`follow_plane`) that could not be written yet
        # is to follow (0: none), kept in the file too (`PLANE_AHEAD`).
        self._renumbering = 0
        self._started_over = False  # a damaged database was moved aside (`_connect`)
        try:
            self._connect()
        except LocalStateError as exc:
            if not degraded_ok:
                raise
            self._degrade(str(exc))
            self._read_degraded()

    # ---- opening ----
    def _connect(self) -> None:
        """Opens the database; a damaged one is moved aside and a new one started with what
        it still says (`outbox_salvage`), once per outbox (a disk that damages every file
        must not fill up with copies)."""
        try:
            self._open()
        except outbox_files.DamagedDatabase as exc:
            if self._started_over:
                raise
            outbox_salvage.start_over(self.path, str(exc))
            self._started_over = True
            self._open()

    def _open(self) -> None:
        """Opens the database (or raises LocalStateError saying why, the disk's state too);
        on a full disk, once more after giving up the ballast."""
        for attempt in (0, 1):
            try:
                self._db = outbox_files.open_database(self.path)
                self._load()
            except (sqlite3.Error, OSError) as exc:
                self._close_db()
                if attempt == 0 and self.space.is_full(exc) and self.space.release_ballast():
                    continue
                raise LocalStateError(self._cannot("be opened", exc)) from None
            except BaseException:
                self._close_db()
                raise
            break
        self.space.restore_ballast()

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _load(self) -> None:
        db = self._conn()
        # Never below a number an acknowledgement that could not be written made known.
        self._next = max(self._next, self._meta("next_seq", 1), self._max_seq() + 1)
        self._acked = self._meta("acked", 0)
        self._evicted = self._meta("evicted", 0)
        self._quarantined = self._meta("quarantined", 0)
        self._renumbering = max(self._renumbering, self._meta(outbox_acks.PLANE_AHEAD, 0))
        self._depth, self._bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records"
        ).fetchone()
        # The pages of the empty schema but the records': all pages past them bound the
        # records' and their index's from above (exact figures come from dbstat; without it,
        # the quarantine's bodies are taken off: the bound holds, a little under).
        others = "SELECT COUNT(*) FROM sqlite_master WHERE rootpage > 0 AND name NOT IN (?, ?)"
        self._baseline = 1 + db.execute(others, EVICTABLE).fetchone()[0]
        self._dbstat = has_dbstat(db)
        self._others = None
        self._marked = {str(a) for (a,) in db.execute("SELECT asset FROM scored")}
        self._alerts.load(db)
        self._scored = {}
        if self._alerts.directory is not None:
            self._adopt_locked(self._alerts.directory)

    def _cannot(self, what: str, exc: BaseException) -> str:
        disk = self.space.describe(exc)
        return f"{self.path}: the outbox database cannot {what}: {exc}" + (
            f" ({disk})" if disk else ""
        )

    def _degrade(self, problem: str) -> None:
        self.problem = problem
        self._retry_at = self._clock() + self.retry_s
        log.error(
            "%s; the agent runs without its outbox: alerts are published on site and wait in "
            "memory, predictions are counted as lost; opening it is retried every %.0f s",
            problem,
            self.retry_s,
        )

    def _read_degraded(self) -> None:
        """What a database that cannot be opened for writing still says (read-only): the
        open alerts, the scoring marks, the numbering; best effort."""
        view = outbox_files.read_only(self.path)
        if view is None:
            return
        self._alerts.load_view(view)
        self._scored = view.scored
        self._next, self._acked = view.next_seq, view.acked
        self._renumbering = view.meta.get(outbox_acks.PLANE_AHEAD, 0)
        self._depth, self._bytes = view.depth, view.bytes

    def _available(self) -> sqlite3.Connection | None:
        """The connection; when degraded, one more try to open it once `retry_s` passed
        (under the lock)."""
        if self._db is not None:
            return self._db
        if self._clock() < self._retry_at:
            return None
        try:
            self._connect()
        except LocalStateError as exc:
            self.problem = str(exc)
            self._retry_at = self._clock() + self.retry_s
            return None
        log.warning("%s: the outbox is open again (it could not be: %s)", self.path, self.problem)
        self.problem = None
        self._changed.notify_all()
        return self._db

    def _conn(self) -> sqlite3.Connection:
        db = self._available()
        if db is None:
            raise LocalStateError(self.problem or f"{self.path}: the outbox is closed")
        return db

    def adopt_open_alerts(self, directory: Path) -> None:
        """Takes over the alerts an older agent kept open as `directory/<asset>.json`, once
        (the files are deleted afterwards; their state is kept here from then on). When the
        outbox is degraded, they count as open until it opens and takes them."""
        with self._lock:
            self._alerts.directory = directory
            if self._db is None:
                self._alerts.assume_files(directory)
                return
            self._adopt_locked(directory)

    def _adopt_locked(self, directory: Path) -> None:
        try:
            migrated = self._read(lambda: self._meta(outbox_files.MIGRATED, 0))
        except LocalStateError as exc:
            # Open from now on and written by the next write that commits (unless the
            # database says then that it took them already): dropped, this run raised their
            # alerts a second time.
            self._alerts.take_over(directory)
            log.error("%s; the open alerts in %s are taken over at the next write", exc, directory)
            return
        if migrated:
            return
        self._alerts.take_over(directory)
        self._others = None
        try:
            self._transaction(self._alerts.write_taken_over, "take the open alerts")
        except LocalStateError as exc:
            log.error("%s; the open alerts in %s are taken over at the next write", exc, directory)
            return
        self._alerts.committed()

    # ---- small helpers (under the lock, connection open) ----
    def _meta(self, key: str, default: int) -> int:
        return outbox_files.meta(self._conn(), key, default)

    def _set_meta(self, key: str, value: int) -> None:
        outbox_files.set_meta(self._conn(), key, value)

    def _max_seq(self) -> int:
        return int(self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])

    def _rollback(self) -> None:
        # A failed COMMIT (disk full) may have ended the transaction already: a ROLLBACK then
        # raised "no transaction is active" and hid the real cause.
        self._others = None  # it may have been counted in what is undone
        if self._db is not None and self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _transaction(self, body: Callable[[sqlite3.Connection], None], what: str) -> None:
        """`body` in one transaction. A full disk gives up the ballast and tries once more
        (then cuts the WAL back); still failing, LocalStateError says why."""
        for attempt in (0, 1):
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                body(db)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if attempt == 0 and self.space.is_full(exc) and self.space.release_ballast():
                    continue
                raise LocalStateError(self._cannot(what, exc)) from None
            except BaseException:
                self._rollback()  # left open, every later write would fail until a restart
                raise
            if attempt:
                self._checkpoint()
            return

    def _read(self, query: Callable[[], _T]) -> _T:
        """`query` (a read outside a transaction), its failure a LocalStateError as a write's:
        a raw sqlite3.Error escaped the acknowledging task unhandled and uncounted."""
        try:
            return query()
        except sqlite3.Error as exc:
            raise LocalStateError(self._cannot("be read", exc)) from None

    def _checkpoint(self) -> None:
        """Cuts the WAL back to nothing (after a full disk: its pages are the space left)."""
        try:
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("%s: the WAL could not be checkpointed: %s", self.path, exc)

    # ---- writing ----
    def append(
        self,
        records: Sequence[tuple[int, bytes]],
        scored: Mapping[str, float | None] | None = None,
        open_alerts: Mapping[str, str | None] | None = None,
    ) -> list[int]:
        """Appends (kind, body) records in one transaction; returns their sequence numbers.

        `body` must not contain the sequence; the caller's encoder adds it when sending.
        `scored`: by asset, the end of the last window decided up to these records, kept in
        the same transaction (`scored_through`); None: none since its stream restarted.
        `open_alerts`: by asset, its open alert (as `open_alert_events` gives it back) or None
        (none open), after these records; assets left out keep theirs. No records: `scored`
        alone is written (windows decided without records), or nothing."""
        if not records and not scored:
            return []
        with self._lock:
            self._conn()  # first: opening it again (degraded) reads the numbering
            first = self._next
            rows = [(first + i, kind, body) for i, (kind, body) in enumerate(records)]
            added = sum(len(body) for _, body in records)
            changed = self._alerts.changes(open_alerts or {})
            outcome: list[tuple[int, int, int]] = []

            def write(db: sqlite3.Connection) -> None:
                outcome.clear()
                if self.space.short():  # under the reserve: displace, do not grow
                    self._insert_displacing(db, rows, outcome)
                else:
                    db.executemany(_INSERT, rows)
                self._set_meta("next_seq", first + len(rows))
                if scored:
                    outbox_files.keep_scored(db, scored)
                if changed or self._alerts.pending or self._marks_change(scored):
                    self._others = None  # before the eviction that counts them
                self._alerts.write(db, changed)
                freed = sum(o[1] for o in outcome)
                outcome.append(
                    self._evict_locked(self._bytes + added - freed, self.max_bytes, below=first)
                )
                lost = sum(o[2] for o in outcome)
                if lost:
                    self._set_meta("evicted", self._evicted + lost)

            self._transaction(write, "write the outbox")
            deleted, freed = sum(o[0] for o in outcome), sum(o[1] for o in outcome)
            self._next = first + len(rows)
            self._depth += len(rows) - deleted
            self._bytes += added - freed
            self._evicted += sum(o[2] for o in outcome)
            self._marked |= {a for a, end in (scored or {}).items() if end is not None}
            self._marked -= {a for a, end in (scored or {}).items() if end is None}
            self._alerts.committed(changed)
            self.space.restore_ballast()
            self._changed.notify_all()
            return [seq for seq, _, _ in rows]

    def _insert_displacing(
        self,
        db: sqlite3.Connection,
        rows: Sequence[tuple[int, int, bytes]],
        outcome: list[tuple[int, int, int]],
    ) -> None:
        """Inserts `rows` without growing the file: where they would (no free pages and no
        room in the last ones), the insert is undone, the oldest records take the room they
        would have grown by, and it is tried again. Evicting whatever they weigh, always,
        deleted records the free pages would have held, and emptied a waiting outbox one
        record per append."""
        size = int(db.execute("PRAGMA page_size").fetchone()[0])
        before = int(db.execute("PRAGMA page_count").fetchone()[0])
        for _ in range(_DISPLACE_TRIES):
            db.execute("SAVEPOINT displace")
            db.executemany(_INSERT, rows)
            grown = int(db.execute("PRAGMA page_count").fetchone()[0]) - before
            if grown <= 0:
                db.execute("RELEASE displace")
                return
            db.execute("ROLLBACK TO displace")
            db.execute("RELEASE displace")
            kept = self._bytes - sum(o[1] for o in outcome)
            done = self._evict_locked(kept, kept - grown * size, False)
            outcome.append(done)
            if not done[0]:  # alert events only: they are written anyway
                break
        db.executemany(_INSERT, rows)

    def _marks_change(self, scored: Mapping[str, float | None] | None) -> bool:
        """Whether `scored` adds or deletes a mark (a new value in place keeps the pages)."""
        return any((end is None) == (a in self._marked) for a, end in (scored or {}).items())

    def _evict_locked(
        self, total: int, limit: int, pages: bool = True, below: int | None = None
    ) -> tuple[int, int, int]:
        """`evict_oldest` in the transaction: `total` record bytes into `limit` and (`pages`)
        the pages they take into `max_bytes`; never the records numbered `below` or higher."""
        bound = (self.max_bytes, self._baseline) if pages else None
        db = self._conn()
        baseline = None if self._dbstat else self._baseline

        def others() -> int:
            if self._others is None:
                self._others = other_pages(db, EVICTABLE, baseline)
            return self._others

        return evict_oldest(
            db, EVICTION_ORDER, total, limit, bound, self.path, below, self._known, others
        )

    def ack(self, up_to: int, rejected: Mapping[int, str] | None = None) -> int:
        """The control plane stored everything up to `up_to`: delete it. Returns rows deleted.

        `rejected` (sequence -> the control plane's reason) are records it refused: they move
        to the quarantine table in the transaction that deletes them, to be looked at, never
        resent. A long stretch goes in transactions of about ACK_CHUNK_BYTES, each its own
        WAL's worth (deleting acknowledged records early is safe: the plane has them), so an
        acknowledgement fits in the space the ballast gives back on a full disk."""
        with self._lock:
            deleted = 0
            if not self._renumbering:
                self._known = max(self._known, up_to)
            try:
                self._conn()  # first: opening it again (degraded) reads the numbering
                if self._renumbering:  # first: unsent records still carry the plane's numbers
                    self._renumber_locked(self._renumbering)
                    self._known = max(self._known, up_to)
                while self._acked < up_to:
                    deleted += self._ack_through(self._chunk_end(up_to), up_to, rejected or {})
            finally:
                # Kept or not, the control plane knows numbers up to `up_to`: the next append
                # (which keeps next_seq) must not reuse them, or this acknowledgement, written
                # later, would delete its records unsent.
                self._next = max(self._next, up_to + 1)
            self.space.restore_ballast()
            return deleted

    def follow_plane(self, last_stored: int) -> int:
        """A session's start: the control plane stored this device's records up to
        `last_stored`. At or past every number this outbox gave out, the outbox is not the one
        the plane heard from (a new file after a damaged one was moved aside, or a backup):
        its unsent records carry numbers the plane has, so they would be dropped as
        duplicates or deleted by acknowledging `last_stored`. They are renumbered after it
        (in order, in one transaction that also records `last_stored` as acknowledged);
        returns how many were. Not written (LocalStateError), it is done at the next call or
        acknowledgement whatever the numbers then (appends may pass `last_stored`), after a
        restart too: the position is kept in the file first (`PLANE_AHEAD`, its own small
        transaction). Degraded, LocalStateError when its view shows no number past
        `last_stored` (it may be a new file once it opens) or a renumbering pending.
        Not detected: a restored outbox that appended past the plane's position before its
        first session (`last_stored` < next sequence, none pending) is taken for the one the
        plane heard from: its unsent records up to `last_stored` are acknowledged away."""
        with self._lock:
            if self._available() is None:  # degraded: its numbering is what its view said
                if last_stored < self._next and not self._renumbering:
                    return 0  # the plane is not ahead of it
                raise LocalStateError(
                    f"{self.problem}; whether the plane's numbers are past this outbox's is "
                    "known once it opens"
                )
            if last_stored < self._next and not self._renumbering:
                return 0
            return self._renumber_locked(last_stored)

    def _renumber_locked(self, last_stored: int) -> int:
        self._renumbering = last_stored = max(last_stored, self._renumbering)
        keep = lambda db: self._set_meta(outbox_acks.PLANE_AHEAD, last_stored)  # noqa: E731
        self._transaction(keep, "keep the plane's position to renumber after")
        numbered = self._next - 1
        # New numbers above both the plane's and this outbox's: never one in use.
        shift = max(last_stored, numbered) - self._acked
        done: list[outbox_acks.Renumbered] = []

        def write(db: sqlite3.Connection) -> None:
            if self._alerts.pending:
                self._others = None
            done[:] = [outbox_acks.renumber(db, self._acked, shift)]  # PLANE_AHEAD goes too
            self._set_meta("acked", max(self._acked, last_stored))
            self._set_meta("next_seq", self._next + shift)
            self._alerts.write_taken_over(db)

        self._transaction(write, "renumber its unsent records")
        self._alerts.committed()
        outbox_acks.log_renumbered(self.path, last_stored, numbered, self._acked, done[0])
        self._acked = max(self._acked, last_stored)
        # Only now: until it is written, an unsent record evicted is lost (`evict_oldest`).
        self._known = max(self._known, last_stored)
        self._next += shift
        self._renumbering = 0
        self.space.restore_ballast()
        self._changed.notify_all()
        return done[0].count

    def _chunk_end(self, up_to: int) -> int:
        """The sequence the next acknowledging transaction goes to (at most `up_to`)."""
        return self._read(lambda: outbox_acks.chunk_end(self._conn(), self._acked, up_to))

    def _ack_through(self, end: int, up_to: int, rejected: Mapping[int, str]) -> int:
        done: list[outbox_acks.Acknowledged] = []

        def write(db: sqlite3.Connection) -> None:
            done.clear()
            done.append(outbox_acks.acknowledge(db, self._acked, end, rejected, self.max_bytes))
            if done[0].quarantined:
                self._set_meta("quarantined", self._quarantined + done[0].quarantined)
                self._others = None
            if self._alerts.pending:
                self._others = None
            self._set_meta("acked", end)
            if end == up_to and up_to >= self._next:  # the plane knows higher numbers
                self._set_meta("next_seq", up_to + 1)
            self._alerts.write_taken_over(db)

        self._transaction(write, "update the outbox")
        self._alerts.committed()
        self._acked = end
        self._quarantined += done[0].quarantined
        self._depth -= done[0].deleted
        self._bytes -= done[0].freed
        return done[0].deleted

    # ---- reading ----
    def pending(self, after: int, limit: int) -> list[tuple[int, int, bytes]]:
        """Up to `limit` (seq, kind, body) records with seq > after, oldest first (none
        while degraded)."""
        with self._lock:
            db = self._available()
            if db is None:
                return []
            return db.execute(
                "SELECT seq, kind, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()

    def wait_for_records(self, after: int, timeout: float) -> bool:
        """Blocks until a record with seq > after exists (True) or `timeout` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: self._next - 1 > after, timeout)

    def scored_through(self) -> dict[str, float]:
        """By asset, the end of the last window whose records (and those before) were kept:
        after a kill -9, where scoring must resume without scoring a window twice."""
        with self._lock:
            if self._db is None:
                return dict(self._scored)
            rows = self._db.execute("SELECT asset, window_end FROM scored").fetchall()
        return {str(asset): float(end) for asset, end in rows}

    def open_alert_events(self) -> dict[str, str]:
        """By asset, the alert kept open with the records written so far (its JSON)."""
        with self._lock:
            return self._alerts.events()

    @property
    def acked(self) -> int:
        return self._acked

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                self._depth,
                self._bytes,
                self._next,
                self._acked,
                self._evicted,
                self._quarantined,
                outbox_files.disk_bytes(self.path),
            )

    def quarantined(self, limit: int = 100) -> list[tuple[int, int, bytes, str]]:
        """The newest refused records: (seq, kind, body, reason)."""
        with self._lock:
            if self._db is None:
                return []
            return outbox_acks.quarantined(self._db, limit)

    def close(self) -> None:
        with self._lock:
            self._close_db()
            self.problem = self.problem or f"{self.path}: the outbox is closed"
            self._retry_at = float("inf")
