"""The outbox's files: its database opened (schema, checks, its meta numbers), a read-only look
at it (an agent starting on a disk it cannot write, `autoglm-edge status`), the open alerts
older agents kept as `alerts/<asset>.json` (taken over once), and the bytes it takes on disk."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import LocalStateError
from edge_agent.open_alerts import OpenAlerts, encode_alert

log = logging.getLogger(__name__)

MIGRATED = "open_alerts_from_files"  # meta key: the alert files were taken over
WAL_KEEP_BYTES = 4 << 20  # the WAL is cut back to this after a checkpoint
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


class DamagedDatabase(LocalStateError):
    """The outbox database is damaged: SQLite's quick_check fails, or it is not a database."""


_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def open_database(path: Path) -> sqlite3.Connection:
    """The outbox database at `path` (made when missing), WAL, synchronous=FULL, checked.
    Raises sqlite3.Error or OSError when it cannot be opened, DamagedDatabase when damaged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        db.executescript(_SCHEMA)
        check = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        db.close()
        if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF in _DAMAGE_CODES:
            raise DamagedDatabase(f"{path}: the outbox database is damaged: {exc}") from None
        raise
    except BaseException:
        db.close()
        raise
    if check != "ok":
        db.close()
        raise DamagedDatabase(f"{path}: the outbox database is damaged: {check}")
    return db


def meta(db: sqlite3.Connection, key: str, default: int) -> int:
    """The number kept under `key` in the meta table; `default` when none is."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else default


def set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
    """Keeps `value` under `key` in the meta table (in the caller's transaction)."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def keep_scored(db: sqlite3.Connection, scored: Mapping[str, float | None]) -> None:
    """The scoring marks of `scored` (by asset, the end of the last window decided; None:
    none) written over the table's (in the caller's transaction). The marks follow the stream,
    back too (its clock stepped back and it restarted at the new time): a mark kept at the
    highest end would skip everything up to it after a kill -9."""
    db.executemany(
        "INSERT INTO scored (asset, window_end) VALUES (?, ?) "
        "ON CONFLICT (asset) DO UPDATE SET window_end = excluded.window_end",
        [(a, end) for a, end in scored.items() if end is not None],
    )
    db.executemany(
        "DELETE FROM scored WHERE asset = ?", [(a,) for a, end in scored.items() if end is None]
    )


@dataclass
class ReadOnlyView:
    """What a database says when read without writing."""

    open_alerts: dict[str, str] = field(default_factory=dict)
    scored: dict[str, float] = field(default_factory=dict)
    meta: dict[str, int] = field(default_factory=dict)
    depth: int = 0
    bytes: int = 0

    @property
    def next_seq(self) -> int:
        return self.meta.get("next_seq", 1)

    @property
    def acked(self) -> int:
        return self.meta.get("acked", 0)

    @property
    def migrated(self) -> bool:
        return bool(self.meta.get(MIGRATED, 0))


def read_only(path: Path) -> ReadOnlyView | None:
    """`path` read without writing anything; None when it cannot be read (logged)."""
    if not path.exists():
        return None
    uris = [f"file:{path}?mode=ro"]
    if not _size(path.with_name(path.name + "-wal")):  # nothing past the file itself
        uris.append(f"file:{path}?immutable=1")
    for uri in uris:
        try:
            with sqlite3.connect(uri, uri=True) as db:
                return _view(db)
        except sqlite3.Error as exc:
            error = exc
    log.warning("%s: the outbox cannot be read either (%s)", path, error)
    return None


def _view(db: sqlite3.Connection) -> ReadOnlyView:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    view = ReadOnlyView()
    if "meta" in tables:
        view.meta = {str(k): int(v) for k, v in db.execute("SELECT key, value FROM meta")}
    if "records" in tables:
        view.depth, view.bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records"
        ).fetchone()
        top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        view.meta["next_seq"] = max(view.next_seq, int(top) + 1)
    if "scored" in tables:
        view.scored = {str(a): float(e) for a, e in db.execute("SELECT * FROM scored")}
    if "open_alerts" in tables:
        view.open_alerts = {str(a): str(e) for a, e in db.execute("SELECT * FROM open_alerts")}
    return view


def legacy_files(directory: Path) -> dict[str, str]:
    """By asset, the open alerts an older agent kept in `directory` (the readable ones)."""
    found: dict[str, str] = {}
    files = OpenAlerts(directory)
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError as exc:
        log.warning("%s: cannot list the open alerts (%s)", directory, exc)
        return found
    for path in paths:
        event = files.load(path.stem)
        if event is not None:
            found[path.stem] = encode_alert(event)
    return found


def remove_files(directory: Path, assets: list[str] | dict[str, str]) -> None:
    """Deletes the files of open alerts taken over (their held marks stay)."""
    for asset in assets:
        path = directory / f"{asset}.json"
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: taken over by the outbox but not deleted (%s)", path, exc)


def disk_bytes(path: Path) -> int:
    """The database and its WAL on disk."""
    return _size(path) + _size(path.with_name(path.name + "-wal"))


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0
