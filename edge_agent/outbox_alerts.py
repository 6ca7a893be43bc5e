"""The alerts open on site as the outbox keeps them: its `open_alerts` table, written in the
transactions of the records that open or clear them, and the take-over of the open alerts an
older agent kept as `alerts/<asset>.json` (written by the first transaction that commits,
before that transaction's own changes, so a clear of one of them deletes it)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from edge_agent import outbox_files

log = logging.getLogger(__name__)


class OpenAlertTable:
    """By asset, the alert open on site (its JSON) as committed with the records, and the
    alert files found and not written yet. Not thread-safe: the outbox calls it under its
    lock, writing in its transactions."""

    def __init__(self) -> None:
        self.directory: Path | None = None  # where an older agent kept its open alerts
        self._open: dict[str, str] = {}
        self._view_migrated = False  # degraded: the files were taken over already
        # The alert files found and not written yet: (their folder, by asset the alert).
        self._adopting: tuple[Path, dict[str, str]] | None = None
        self._added: set[str] = set()  # the assets those files added to the table's
        self._stale = False  # the write found them taken over already (files left behind)

    def load(self, db: sqlite3.Connection) -> None:
        """The table as committed (the database just opened); nothing is pending."""
        self._open = {str(a): str(e) for a, e in db.execute("SELECT asset, event FROM open_alerts")}
        self._adopting = None

    def load_view(self, view: outbox_files.ReadOnlyView) -> None:
        """The table as a database that cannot be opened for writing says (degraded)."""
        self._open = view.open_alerts
        self._view_migrated = view.migrated

    def assume_files(self, directory: Path) -> None:
        """Degraded: the files in `directory` count as open until the outbox opens and takes
        them (unless the database says it took them already)."""
        if not self._view_migrated:
            self._open = outbox_files.legacy_files(directory) | self._open

    def take_over(self, directory: Path) -> None:
        """The files in `directory` are open from now on, and kept until a write commits them:
        the next append or acknowledgement takes them over. Before, a failed take-over left
        the files to be read again at the next start, after their alerts might have been
        cleared here, and they came back open."""
        found = outbox_files.legacy_files(directory)
        self._added = set(found) - set(self._open)
        self._open = found | self._open
        self._adopting = (directory, found)

    def changes(self, open_alerts: Mapping[str, str | None]) -> dict[str, str | None]:
        """Of `open_alerts` (by asset, its open alert or None), those that differ from the
        table."""
        return {a: e for a, e in open_alerts.items() if self._open.get(a) != e}

    @property
    def pending(self) -> bool:
        """Whether alert files were found and not written yet (the next write takes them)."""
        return self._adopting is not None

    def write_taken_over(self, db: sqlite3.Connection) -> None:
        """In a write transaction: the alert files found, when not written yet."""
        if self._adopting is None:
            return
        # Taken over before (whether they were could not be read then): files left behind
        # whose alerts may have been cleared since; they are deleted, not taken.
        self._stale = bool(outbox_files.meta(db, outbox_files.MIGRATED, 0))
        if self._stale:
            return
        sql = "INSERT OR IGNORE INTO open_alerts (asset, event) VALUES (?, ?)"
        db.executemany(sql, self._adopting[1].items())
        outbox_files.set_meta(db, outbox_files.MIGRATED, 1)

    def write(self, db: sqlite3.Connection, changed: Mapping[str, str | None]) -> None:
        """In a write transaction: the files found first, then `changed` (from `changes`)."""
        self.write_taken_over(db)
        db.executemany(
            "INSERT INTO open_alerts (asset, event) VALUES (?, ?) "
            "ON CONFLICT (asset) DO UPDATE SET event = excluded.event",
            [(a, e) for a, e in changed.items() if e is not None],
        )
        db.executemany(
            "DELETE FROM open_alerts WHERE asset = ?",
            [(a,) for a, e in changed.items() if e is None],
        )

    def committed(self, changed: Mapping[str, str | None] | None = None) -> None:
        """After the commit that wrote them: the files taken over go, `changed` holds."""
        if self._adopting is not None:
            directory, found = self._adopting
            self._adopting = None
            outbox_files.remove_files(directory, found)
            if self._stale:
                for asset in self._added - set(changed or {}):
                    self._open.pop(asset, None)
            elif found:
                log.info("took over %d open alert(s) from %s", len(found), directory)
        for asset, event in (changed or {}).items():
            if event is None:
                self._open.pop(asset, None)
            else:
                self._open[asset] = event

    def events(self) -> dict[str, str]:
        """By asset, the open alert (a copy)."""
        return dict(self._open)
