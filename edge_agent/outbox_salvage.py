"""A damaged outbox database moved aside and a new one started in its place, holding what
could still be read from the old one: its numbering and acknowledged mark, the alerts open on
site and the scoring marks, and the records still readable. Without it, an agent whose outbox
failed SQLite's quick_check ran degraded until someone moved the file by hand."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from edge_agent import outbox_files
from edge_agent.errors import LocalStateError
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
_SUFFIXES = ("", "-wal", "-shm")  # the database, its WAL and its shared memory
_ROWS = 1000  # records read and written at a time
_COUNTERS = ("acked", "evicted", "quarantined", outbox_files.MIGRATED)
_PREDICTION, _ALERT = 1, 2  # outbox.PREDICTION, outbox.ALERT (record kinds)


def start_over(path: Path, problem: str) -> Path:
    """Moves the damaged database at `path` (its WAL and shared memory along) to
    `<name>.damaged-<UTC time>`, kept for inspection, and makes a new one at `path` with what
    the old one still says (logged). Returns where the old one went. LocalStateError when it
    cannot be moved, or the new one cannot be written (the old one is then put back: the
    next try starts again, and no copies pile up)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    moved: list[tuple[Path, Path]] = []
    try:
        for suffix in _SUFFIXES:
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.rename(kept.with_name(kept.name + suffix))
                moved.append((part, kept.with_name(kept.name + suffix)))
        view = outbox_files.read_only(kept)
        salvaged = _seed(path, kept, view)
    except (sqlite3.Error, OSError, LocalStateError) as exc:
        back = _put_back(path, moved)
        raise LocalStateError(
            f"{problem}; it cannot be moved aside and a new outbox started ({exc}){back}"
        ) from None
    if view is None:
        said = "nothing could be read from it: numbering starts again (renumbered after the "
        said += "control plane's position at the next session)"
    else:
        said = (
            f"{salvaged} of its {view.depth} record(s) could be read and are kept, with its "
            f"numbering (next {view.next_seq}), {len(view.open_alerts)} open alert(s) and "
            f"{len(view.scored)} scoring mark(s)"
        )
    log.error(
        "%s; moved aside to %s (kept for inspection) and a new outbox started: %s",
        problem,
        kept,
        said,
    )
    return kept


def _put_back(path: Path, moved: list[tuple[Path, Path]]) -> str:
    """The damaged files back where they were, the new one's removed; what could not be."""
    try:
        for suffix in _SUFFIXES:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        for original, aside in moved:
            aside.rename(original)
    except OSError as exc:
        return f"; not put back either ({exc}): it is at {moved[0][1]}"
    return ""


def _seed(path: Path, kept: Path, view: outbox_files.ReadOnlyView | None) -> int:
    """The new database at `path`, holding what `view` and the records readable in `kept`
    say, in one transaction; how many records it holds."""
    db = outbox_files.open_database(path)
    try:
        db.execute("BEGIN IMMEDIATE")
        top = salvaged = 0
        if view is not None:
            stopped: list[str] = []  # why the records could not be read to the end
            seen = _Seen()  # what the records read say of alerts and windows
            for rows in _readable(kept, view.acked, stopped):
                db.executemany(
                    "INSERT OR IGNORE INTO records (seq, kind, body) VALUES (?, ?, ?)", rows
                )
                salvaged += len(rows)
                top = max(top, rows[-1][0])
                seen.read(rows)
            if stopped:
                view.open_alerts = _sent_or_salvaged(kept, view.open_alerts, seen)
            for key in _COUNTERS:
                if key in view.meta:
                    outbox_files.set_meta(db, key, view.meta[key])
            outbox_files.set_meta(db, "next_seq", max(view.next_seq, top + 1))
            db.executemany("INSERT INTO open_alerts VALUES (?, ?)", view.open_alerts.items())
            db.executemany("INSERT INTO scored VALUES (?, ?)", view.scored.items())
        db.execute("COMMIT")
        return salvaged
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()


class _Seen:
    """Of the records read: the alert keys they raise, and by asset the end of the latest
    window they were decided on (predictions and alert events)."""

    def __init__(self) -> None:
        self.raised: set[str] = set()
        self.latest: dict[str, float] = {}

    def read(self, rows: list[tuple[int, int, bytes]]) -> None:
        for _, kind, body in rows:
            if kind not in (_PREDICTION, _ALERT):
                continue
            try:
                record = agent_pb2.Record.FromString(body)
            except Exception:  # noqa: BLE001 - a damaged body tells nothing
                continue
            item = record.prediction if kind == _PREDICTION else record.alert
            if kind == _ALERT and record.alert.kind == agent_pb2.AlertEvent.KIND_RAISED:
                self.raised.add(record.alert.alert_key)
            end = item.window_end.seconds + item.window_end.nanos / 1e9
            self.latest[item.asset] = max(self.latest.get(item.asset, end), end)


def _sent_or_salvaged(kept: Path, open_alerts: dict[str, str], seen: _Seen) -> dict[str, str]:
    """Of the alerts `open_alerts` says are open (by asset, its JSON), those whose raise is
    known to be with the plane or among the records read: read itself, or written before a
    record read (one of that asset decided on a later window: its raise was then at or
    before the acknowledged mark). The records were not read to the end: an alert raised by
    one of those lost would stay open here while the plane never gets it (its clear, later,
    clearing nothing there). Dropped (logged), it is raised again if the fault goes on. An
    alert acknowledged with no later record of its asset read is dropped too (nothing says
    where its raise was): the plane's alert is then not cleared from here."""
    kept_open = {}
    for asset, text in open_alerts.items():
        try:
            doc = json.loads(text)
            key, end = str(doc["key"]), float(doc["window_end"])
        except (ValueError, TypeError, KeyError):
            kept_open[asset] = text  # not an alert's JSON: loading it says so
            continue
        if key in seen.raised or seen.latest.get(asset, end) > end:
            kept_open[asset] = text
            continue
        log.warning(
            "%s: the alert %s open on %s is not kept open: its raise is not among the records "
            "that could be read, nor known to be acknowledged (it may have been lost with the "
            "rest); it is raised again if the fault goes on",
            kept,
            key,
            asset,
        )
    return kept_open


def _readable(kept: Path, acked: int, stopped: list[str]) -> Iterator[list[tuple[int, int, bytes]]]:
    """The records after `acked` in the damaged database, in batches, up to the first that
    cannot be read (logged, the reason added to `stopped`); rows that are not (number,
    kind, bytes) are left out."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{kept}?mode=ro", uri=True)) as old:
            cursor = old.execute(
                "SELECT seq, kind, body FROM records WHERE seq > ? ORDER BY seq", (acked,)
            )
            while rows := cursor.fetchmany(_ROWS):
                whole = [
                    (s, k, b)
                    for s, k, b in rows
                    if isinstance(s, int) and isinstance(k, int) and isinstance(b, bytes)
                ]
                if whole:
                    yield whole
    except sqlite3.Error as exc:
        log.warning("%s: its records cannot be read past this point (%s)", kept, exc)
        stopped.append(str(exc))
