"""The outbox: predictions, alert events and window captures waiting for the control plane,
in SQLite (WAL), with the alerts open on site committed in the same transactions.

Every record gets the next sequence number when it is written; the control plane stores each
(device, sequence) once and acknowledges "everything up to N", after which those rows go.
The outbox is bounded in bytes: past the bound the oldest window captures are evicted first,
then the oldest predictions (counted); alert events never are. Writes are committed with
synchronous=FULL, so a record that was appended survives kill -9 and power loss.

The alerts open on each asset (`open_alerts`) and where scoring got to (`scored`) are kept
with the records that changed them, so after a kill the three always agree: an alert event
the control plane will get is open here, and one it will never get is not.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent import outbox_files
from edge_agent.errors import LocalStateError

log = logging.getLogger(__name__)

PREDICTION = 1
ALERT = 2
CAPTURE = 3
EVICTION_ORDER = (CAPTURE, PREDICTION)  # what goes first under disk pressure; alerts never
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_kind_seq ON records (kind, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scored (asset TEXT PRIMARY KEY, window_end REAL NOT NULL);
CREATE TABLE IF NOT EXISTS open_alerts (asset TEXT PRIMARY KEY, event TEXT NOT NULL);
"""
QUARANTINE_KEEP = 10_000  # newest refused records kept for inspection
_EVICT_CHUNK = 256


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    next_sequence: int
    acked: int
    evicted: int
    quarantined: int = 0  # records the control plane refused, ever (the newest are kept)


class Outbox:
    """Thread-safe: the inference thread appends, the session's sync reads and acknowledges."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise LocalStateError(f"{path}: the outbox database cannot be opened: {exc}") from None
        if check != "ok":
            raise LocalStateError(f"{path}: the outbox database is damaged: {check}")
        self._next = max(self._meta("next_seq", 1), self._max_seq() + 1)
        self._acked = self._meta("acked", 0)
        self._evicted = self._meta("evicted", 0)
        self._quarantined = self._meta("quarantined", 0)
        self._depth, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records"
        ).fetchone()
        self._open: dict[str, str] = {  # by asset: the open alert as kept
            str(a): str(e) for a, e in self._db.execute("SELECT asset, event FROM open_alerts")
        }

    def adopt_open_alerts(self, directory: Path) -> None:
        """Takes over the alerts an older agent kept open as `directory/<asset>.json`, once
        (the files are deleted afterwards; their state is kept here from then on)."""
        with self._lock:
            if self._meta(outbox_files.MIGRATED, 0):
                return
            found = outbox_files.legacy_files(directory)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                sql = "INSERT OR IGNORE INTO open_alerts (asset, event) VALUES (?, ?)"
                self._db.executemany(sql, found.items())
                self._set_meta(outbox_files.MIGRATED, 1)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                log.error("%s: cannot take the open alerts in %s (%s); read again at the next "
                          "start", self.path, directory, exc)  # fmt: skip
                self._open = found | self._open
                return
            self._open = found | self._open
        outbox_files.remove_files(directory, found)
        if found:
            log.info("took over %d open alert(s) from %s", len(found), directory)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])

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
        (none open), after these records; assets left out keep theirs."""
        if not records:
            return []
        with self._lock:
            first = self._next
            rows = [(first + i, kind, body) for i, (kind, body) in enumerate(records)]
            added = sum(len(body) for _, body in records)
            changed = {a: e for a, e in (open_alerts or {}).items() if self._open.get(a) != e}
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records (seq, kind, body) VALUES (?, ?, ?)", rows)
                self._set_meta("next_seq", first + len(rows))
                if scored:
                    self._keep_scored(scored)
                self._keep_open(changed)
                evicted, freed = self._evict_locked(self._bytes + added)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise LocalStateError(f"{self.path}: cannot write the outbox: {exc}") from None
            except BaseException:
                self._rollback()  # left open, every later write would fail until a restart
                raise
            self._next = first + len(rows)
            self._depth += len(rows) - evicted
            self._bytes += added - freed
            self._evicted += evicted
            for asset, event in changed.items():
                if event is None:
                    self._open.pop(asset, None)
                else:
                    self._open[asset] = event
            self._changed.notify_all()
            return [seq for seq, _, _ in rows]

    def _rollback(self) -> None:
        # A failed COMMIT (disk full) may have ended the transaction already: a ROLLBACK then
        # raised "no transaction is active" and hid the real cause.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _keep_open(self, changed: Mapping[str, str | None]) -> None:
        self._db.executemany(
            "INSERT INTO open_alerts (asset, event) VALUES (?, ?) "
            "ON CONFLICT (asset) DO UPDATE SET event = excluded.event",
            [(a, e) for a, e in changed.items() if e is not None],
        )
        gone = [(a,) for a, e in changed.items() if e is None]
        self._db.executemany("DELETE FROM open_alerts WHERE asset = ?", gone)

    def _keep_scored(self, scored: Mapping[str, float | None]) -> None:
        """The marks follow the stream, back too (its clock stepped back and it restarted at
        the new time): a mark kept at the highest end would skip everything up to it after a
        kill -9."""
        self._db.executemany(
            "INSERT INTO scored (asset, window_end) VALUES (?, ?) "
            "ON CONFLICT (asset) DO UPDATE SET window_end = excluded.window_end",
            [(a, end) for a, end in scored.items() if end is not None],
        )
        self._db.executemany(
            "DELETE FROM scored WHERE asset = ?", [(a,) for a, end in scored.items() if end is None]
        )

    def _evict_locked(self, total: int) -> tuple[int, int]:
        """Deletes the oldest captures, then the oldest predictions, until `total` bytes fit
        (inside the transaction)."""
        evicted = freed = 0
        while total - freed > self.max_bytes:
            victims = []
            for kind in EVICTION_ORDER:
                victims = self._db.execute(
                    "SELECT seq, LENGTH(body) FROM records WHERE kind = ? ORDER BY seq LIMIT ?",
                    (kind, _EVICT_CHUNK),
                ).fetchall()
                if victims:
                    break
            if not victims:
                log.warning(
                    "outbox %s holds %d bytes of alert events, over its %d-byte bound; alert "
                    "events are never evicted",
                    self.path,
                    total - freed,
                    self.max_bytes,
                )
                break
            take = []
            for seq, size in victims:
                take.append((seq,))
                freed += size
                evicted += 1
                if total - freed <= self.max_bytes:
                    break
            self._db.executemany("DELETE FROM records WHERE seq = ?", take)
        if evicted:
            self._set_meta("evicted", self._evicted + evicted)
        return evicted, freed

    def pending(self, after: int, limit: int) -> list[tuple[int, int, bytes]]:
        """Up to `limit` (seq, kind, body) records with seq > after, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, kind, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()

    def wait_for_records(self, after: int, timeout: float) -> bool:
        """Blocks until a record with seq > after exists (True) or `timeout` passes."""
        with self._changed:
            return self._changed.wait_for(lambda: self._next - 1 > after, timeout)

    def ack(self, up_to: int, rejected: Mapping[int, str] | None = None) -> int:
        """The control plane stored everything up to `up_to`: delete it. Returns rows deleted.

        `rejected` (sequence -> the control plane's reason) are records it refused: they move
        to the quarantine table in the same transaction, to be looked at, never resent."""
        with self._lock:
            if up_to <= self._acked:
                return 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved = 0
                for seq, reason in sorted((rejected or {}).items()):
                    moved += self._db.execute(
                        "INSERT OR REPLACE INTO quarantine (seq, kind, body, reason) "
                        "SELECT seq, kind, body, ? FROM records WHERE seq = ? AND seq > ?",
                        (reason, seq, self._acked),
                    ).rowcount
                if moved:
                    self._db.execute(
                        "DELETE FROM quarantine WHERE seq NOT IN "
                        "(SELECT seq FROM quarantine ORDER BY seq DESC LIMIT ?)",
                        (QUARANTINE_KEEP,),
                    )
                    self._set_meta("quarantined", self._quarantined + moved)
                freed, deleted = self._db.execute(
                    "SELECT COALESCE(SUM(LENGTH(body)), 0), COUNT(*) FROM records WHERE seq <= ?",
                    (up_to,),
                ).fetchone()
                self._db.execute("DELETE FROM records WHERE seq <= ?", (up_to,))
                self._set_meta("acked", up_to)
                if up_to >= self._next:  # the control plane knows higher numbers: never reuse
                    self._next = up_to + 1
                    self._set_meta("next_seq", self._next)
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if not isinstance(exc, sqlite3.Error):
                    raise
                # Kept or not, the control plane knows numbers up to `up_to`: the next append
                # (which keeps next_seq) must not reuse them, or this acknowledgement, written
                # later, would delete its records unsent.
                self._next = max(self._next, up_to + 1)
                raise LocalStateError(f"{self.path}: cannot update the outbox: {exc}") from None
            self._acked = up_to
            self._quarantined += moved
            self._depth -= deleted
            self._bytes -= freed
            return int(deleted)

    def scored_through(self) -> dict[str, float]:
        """By asset, the end of the last window whose records (and those before) were kept:
        after a kill -9, where scoring must resume without scoring a window twice."""
        with self._lock:
            rows = self._db.execute("SELECT asset, window_end FROM scored").fetchall()
        return {str(asset): float(end) for asset, end in rows}

    def open_alert_events(self) -> dict[str, str]:
        """By asset, the alert kept open with the records written so far (its JSON)."""
        with self._lock:
            return dict(self._open)

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
            )

    def quarantined(self, limit: int = 100) -> list[tuple[int, int, bytes, str]]:
        """The newest refused records: (seq, kind, body, reason)."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, kind, body, reason FROM quarantine ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
