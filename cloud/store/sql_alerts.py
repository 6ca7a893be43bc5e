"""Alerts in SQL: edge raise/clear events grouped into alerts, and the operator lifecycle.

A raise opens an alert for its (device, asset, fault) group, or folds into the open one
(peak score, last seen, top sensors of the peak); a clear resolves the open one; a device
has at most MAX_OPEN_ALERTS open (`alert_fold` says what happens to raises beyond). Events
arrive at most once (the record sync is idempotent per device and sequence) and are applied
in the transaction that stores them, so a crash cannot apply an event twice or lose it.
Every change takes the next revision from a one-row counter, locked in the transaction:
watch streams and deliveries follow revisions, not clocks. Webhook deliveries are queued in
the same transaction (`enqueue_deliveries`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from cloud.domain import (
    VERDICTS,
    AlertEventRecord,
    AlertFilter,
    AlertNote,
    AlertRecord,
    AlertState,
)
from cloud.maintenance import covering
from cloud.store.alert_fold import EventFold, LimitWarnings, limit_key, open_key
from cloud.store.sql_base import SqlBase, id_chunks
from cloud.store.sql_maintenance import windows_in_force
from cloud.store.sql_webhooks import enqueue_deliveries
from cloud.store.tables import AlertRevisionRow, AlertRow, DeviceRow
from edge_agent.errors import FailedPrecondition, InvalidInput, NotFound

MAX_NOTE = 2000


def _lock_alerts(s: Session) -> None:
    """Every transaction that changes alerts takes the revision counter's lock first, before
    it reads any alert: one lock order (no deadlock between an edge event and an operator's
    ack), and what it reads next is what the last writer committed (no lost update)."""
    counter = s.get(AlertRevisionRow, 1, with_for_update=True)
    assert counter is not None, "migration 0004 creates the counter row"


def _next_revision(s: Session) -> int:
    return _next_revisions(s, 1)


def _next_revisions(s: Session, n: int) -> int:
    """Takes `n` revisions from the counter (one update however many); the first of them."""
    counter = s.get(AlertRevisionRow, 1, with_for_update=True)
    assert counter is not None, "migration 0004 creates the counter row"
    counter.value += n
    return counter.value - n + 1


_limit_warnings = LimitWarnings()


def open_counts(device_ids: Sequence[str]) -> Select[str, int]:
    """The open alerts of each of `device_ids` (ix_alerts_open_device: the open ones only)."""
    return (
        select(AlertRow.device_id, func.count())
        .where(AlertRow.device_id.in_(device_ids), AlertRow.open_key.is_not(None))
        .group_by(AlertRow.device_id)
    )


def apply_alert_events(
    s: Session, events: Sequence[AlertEventRecord], now: dt.datetime
) -> list[AlertRecord]:
    """Folds newly stored edge events into alerts (in `s`'s transaction); the changed alerts.

    In sets, so a batch of thousands holds the alert lock for a few statements, not a few per
    event: one read of the batch's open alerts and the open counts of its devices, the events
    folded in memory (`alert_fold`), one revision range for the changed alerts, then one
    flush of them and their deliveries."""
    if not events:
        return []
    _lock_alerts(s)
    devices = sorted({e.device_id for e in events})
    keys = sorted({open_key(e.device_id, e.asset, e.fault) for e in events})
    keys += [limit_key(d) for d in devices]
    open_rows: list[AlertRow] = []
    for chunk in id_chunks(keys):
        open_rows += s.scalars(select(AlertRow).where(AlertRow.open_key.in_(chunk))).all()
    counts: dict[str, int] = {}
    for chunk in id_chunks(devices):
        counts.update((device_id, int(n)) for device_id, n in s.execute(open_counts(chunk)))
    for row in open_rows:  # the limit alert is not one of the alerts it limits
        if row.open_key == limit_key(row.device_id):
            counts[row.device_id] -= 1
    fold = EventFold(open_rows, counts)
    for event in sorted(events, key=lambda e: e.sequence):
        fold.apply(event, now)
    rows = list(fold.changed.values())
    if not rows:
        return []
    with s.no_autoflush:  # the rows are written once, as announce leaves them
        first = _next_revisions(s, len(rows))
        for i, row in enumerate(rows):
            row.revision = first + i
        s.add_all(fold.added)
        changed = announce(s, rows, now, edge_time=True)
    s.flush()
    if fold.not_opened:
        _limit_warnings.add(fold.not_opened)
    return changed


def _labels(s: Session, rows: Sequence[AlertRow | _Hold]) -> dict[str, dict[str, str]]:
    """The labels of the rows' devices, read in IN lists of ID_CHUNK (the fleet's alerts
    may name more devices than one statement's bound parameters allow)."""
    labels: dict[str, dict[str, str]] = {}
    for chunk in id_chunks(sorted({r.device_id for r in rows})):
        query = select(DeviceRow.id, DeviceRow.labels).where(DeviceRow.id.in_(chunk))
        labels.update((device_id, dict(lb or {})) for device_id, lb in s.execute(query).all())
    return labels


def announce(
    s: Session, rows: Sequence[AlertRow], now: dt.datetime, edge_time: bool = False
) -> list[AlertRecord]:
    """Marks why each changed alert is held back, if it is (shelved, a maintenance window),
    and queues deliveries of the others (in `s`'s transaction); the changed alerts.

    A change of an active alert is delivered when nothing holds it back; the change that
    closes an alert is delivered when its opening was (so no receiver keeps a stale alert,
    and none hears of an alert that closed unseen). With `edge_time`, windows are judged at
    the edge's time of the change (its last window), as the agent judged them on site: a
    backlog synced after a window is held back like the live stream was."""
    if not rows:
        return []
    at = {r.id: (min(r.last_seen, now) if edge_time else now) for r in rows}
    windows = windows_in_force(s, min(at.values()))
    labels = _labels(s, rows) if windows else {}
    deliver: list[AlertRecord] = []
    alerts = []
    for row in rows:
        doc = dict(row.doc)
        reason = ""
        active = AlertState(row.state).active
        until = doc.get("shelved_until")
        if until and dt.datetime.fromisoformat(until) > now:
            reason = "shelved"
        elif active and (window := (
            covering(windows, labels.get(row.device_id, {}), row.asset, at[row.id])
            # Also while a window is in force now (a device clock hours off).
            or covering(windows, labels.get(row.device_id, {}), row.asset, now)
        )):  # fmt: skip
            # Only an active alert: a closed one's close is delivered exactly when its
            # opening was, whatever window is in force, so no window holds it back (nor
            # keeps it among the alerts every sweep looks at for as long as the window lasts).
            reason = window.label
        doc["suppressed_by"] = reason
        # Alerts from before this flag existed were all delivered when they opened.
        announced = bool(doc.get("announced", True))
        if active and not reason:
            doc["announced"] = True
        row.doc = doc
        alert = _alert(row)
        alerts.append(alert)
        if (active and not reason) or (not active and announced):
            deliver.append(alert)
    enqueue_deliveries(s, deliver, now)
    return alerts


class AlertTables(SqlBase):
    """The alerts part of `Store`."""

    def list_alerts(self, where: AlertFilter, limit: int = 100) -> list[AlertRecord]:
        query = select(AlertRow)
        if where.state is not None:
            query = query.where(AlertRow.state == where.state.value)
        if where.device_id:
            query = query.where(AlertRow.device_id == where.device_id)
        if where.since is not None:
            query = query.where(AlertRow.last_seen >= where.since)
        if where.verdict is not None:
            verdict = AlertRow.doc["verdict"].as_string()
            if where.verdict:
                query = query.where(verdict == where.verdict)
            else:
                query = query.where(or_(verdict.is_(None), verdict == ""))
        query = query.order_by(AlertRow.last_seen.desc(), AlertRow.revision.desc()).limit(limit)
        with self._read_tx() as s:
            return [_alert(r) for r in s.scalars(query).all()]

    def get_alert(self, alert_id: str) -> AlertRecord:
        with self._tx() as s:
            row = s.get(AlertRow, _full_alert_id(s, alert_id))
            if row is None:
                raise NotFound(f"no alert with id '{alert_id}'")
            return _alert(row)

    def alerts_after(self, revision: int, limit: int = 500) -> list[AlertRecord]:
        """Alerts changed after `revision`, oldest change first (one entry per alert, at
        its latest revision)."""
        query = (
            select(AlertRow)
            .where(AlertRow.revision > revision)
            .order_by(AlertRow.revision)
            .limit(limit)
        )
        with self._tx() as s:
            return [_alert(r) for r in s.scalars(query).all()]

    def alert_revision(self) -> int:
        with self._tx() as s:
            counter = s.get(AlertRevisionRow, 1)
            return counter.value if counter is not None else 0

    def update_alert(
        self,
        alert_id: str,
        action: str,
        note: str,
        by: str,
        now: dt.datetime,
        verdict: str = "",
        fault_type: str = "",
    ) -> AlertRecord:
        if action not in ("ack", "resolve"):
            raise InvalidInput(f"unknown alert action {action!r}")
        check_verdict(verdict, fault_type)
        if len(note) > MAX_NOTE:
            raise InvalidInput(f"a note holds at most {MAX_NOTE} characters, got {len(note)}")
        with self._tx() as s:
            row = self._locked(s, alert_id)
            closed = row.state == AlertState.RESOLVED.value
            if closed and not verdict:
                raise FailedPrecondition(
                    f"alert {row.id} is resolved (by {row.doc.get('resolved_by') or '?'}); "
                    "nothing to acknowledge or resolve (a --verdict may still be given)"
                )
            doc: dict[str, Any] = dict(row.doc)
            if note:
                doc["notes"] = [*doc.get("notes", []), [now.isoformat(), by, note]]
            if verdict:
                doc.update(verdict=verdict, fault_type=fault_type, verdict_by=by)
            if closed:
                pass  # a late verdict: the state stays
            elif action == "ack" and row.state != AlertState.RETURNED.value:
                row.state = AlertState.ACKNOWLEDGED.value
                doc["acknowledged_by"] = by
            else:  # resolve, or the acknowledgement that closes a returned alert
                if action == "ack":
                    doc["acknowledged_by"] = by
                else:
                    doc["resolved_by"] = by
                    row.resolved_at = now
                row.state = AlertState.RESOLVED.value
                row.open_key = None
            return self._changed(s, row, doc, now)

    def shelve_alert(
        self, alert_id: str, until: dt.datetime, reason: str, by: str, now: dt.datetime
    ) -> AlertRecord:
        """Holds back its deliveries until `until` (stored and kept current meanwhile)."""
        if not reason.strip():
            raise InvalidInput("shelving needs a --reason (shown to everyone who sees it)")
        if len(reason) > MAX_NOTE:
            raise InvalidInput(f"a reason holds at most {MAX_NOTE} characters, got {len(reason)}")
        if until <= now:
            raise InvalidInput("shelving needs a duration above zero (--for 8h)")
        with self._tx() as s:
            row = self._locked(s, alert_id)
            if row.state == AlertState.RESOLVED.value:
                raise FailedPrecondition(f"alert {row.id} is resolved; there is nothing to shelve")
            doc = {
                **row.doc,
                "shelved_until": until.isoformat(),
                "shelved_by": by,
                "shelve_reason": reason,
                "notes": [*row.doc.get("notes", []), [now.isoformat(), by, f"shelved: {reason}"]],
            }
            return self._changed(s, row, doc, now)

    def unshelve_alert(self, alert_id: str, by: str, now: dt.datetime) -> AlertRecord:
        with self._tx() as s:
            row = self._locked(s, alert_id)
            if not row.doc.get("shelved_until"):
                raise FailedPrecondition(f"alert {row.id} is not shelved")
            # A closed alert's unshelving is no news to a receiver.
            quiet = not AlertState(row.state).active
            return self._changed(s, row, _unshelved(row.doc, by, now), now, quiet)

    def release_suppressed(self, now: dt.datetime) -> list[AlertRecord]:
        """Alerts held back by a shelving or window that has ended: delivered again when still
        active (ISA-18.2: an alarm that comes back from shelving is annunciated).

        Which ones is judged first without any lock (most sweeps release nothing, however
        many alerts a window holds back); only those are then locked, under the alert lock,
        and judged again as they are now."""
        suppressed_by = AlertRow.doc["suppressed_by"].as_string()
        shelved_until = AlertRow.doc["shelved_until"].as_string()
        held_back = or_(func.coalesce(suppressed_by, "") != "", shelved_until.is_not(None))
        # Of each alert only what the judgement needs: not its whole doc.
        columns = (AlertRow.id, AlertRow.device_id, AlertRow.asset, AlertRow.state)
        query = select(*columns, suppressed_by, shelved_until).where(
            AlertRow.state != AlertState.RESOLVED.value, held_back
        )
        with self._read_tx() as s:
            due = sorted(_releasable(s, [_Hold(*r) for r in s.execute(query).all()], now))
        if not due:
            return []
        with self._tx() as s:
            _lock_alerts(s)
            rows: list[AlertRow] = []
            for chunk in id_chunks(due):
                locked = select(AlertRow).where(AlertRow.id.in_(chunk)).with_for_update()
                rows += s.scalars(locked).all()
            # Changed meanwhile? Judged again, locked.
            still = _releasable(s, [_Hold.of(r) for r in rows], now)
            rows = sorted((r for r in rows if r.id in still), key=lambda r: r.revision)
            if not rows:
                return []
            with s.no_autoflush:  # the rows are written once, as announce leaves them
                first = _next_revisions(s, len(rows))
                released, quiet = [], []
                for i, row in enumerate(rows):
                    doc = dict(row.doc)
                    until = doc.get("shelved_until")
                    if until and dt.datetime.fromisoformat(until) <= now:
                        doc = _unshelved(doc, "", now)
                    row.revision = first + i
                    if AlertState(row.state).active:
                        row.doc = doc
                        released.append(row)
                    else:  # closed: nothing to annunciate
                        row.doc = {**doc, "suppressed_by": ""}
                        quiet.append(_alert(row))
                announced = announce(s, released, now)
            return [*announced, *quiet]

    def _locked(self, s: Session, alert_id: str) -> AlertRow:
        _lock_alerts(s)
        row = s.get(AlertRow, _full_alert_id(s, alert_id), with_for_update=True)
        if row is None:
            raise NotFound(f"no alert with id '{alert_id}'")
        return row

    def _changed(
        self, s: Session, row: AlertRow, doc: dict[str, Any], now: dt.datetime, quiet: bool = False
    ) -> AlertRecord:
        row.revision = _next_revision(s)
        row.doc = {**doc, "suppressed_by": ""} if quiet else doc
        s.flush()
        return _alert(row) if quiet else announce(s, [row], now)[0]


FAULT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,63}$")


def check_verdict(verdict: str, fault_type: str) -> None:
    if verdict and verdict not in VERDICTS:
        raise InvalidInput(f"--verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if fault_type and not verdict:
        raise InvalidInput("--fault-type goes with a --verdict (true: the fault was real)")
    if fault_type and not FAULT_TYPE.match(fault_type):
        raise InvalidInput(
            f"--fault-type {fault_type[:80]!r}: up to 64 letters, digits, spaces and _.:/-"
        )


class _Hold(NamedTuple):
    """What the sweep judges of a held-back alert (`_released`)."""

    id: str
    device_id: str
    asset: str
    state: str
    suppressed_by: str | None
    shelved_until: str | None

    @classmethod
    def of(cls, r: AlertRow) -> _Hold:
        doc = r.doc
        return cls(r.id, r.device_id, r.asset, r.state, doc.get("suppressed_by"),
                   doc.get("shelved_until"))  # fmt: skip


def _releasable(s: Session, holds: Sequence[_Hold], now: dt.datetime) -> set[str]:
    """The ids of the alerts whose hold has ended (`_released`)."""
    windows = [w for w in windows_in_force(s, now) if w.active(now)]
    labels = _labels(s, holds) if windows and holds else {}
    covered = {h.id for h in holds if covering(windows, labels.get(h.device_id, {}), h.asset, now)}
    return {h.id for h in holds if _released(h, h.id in covered, now)}


def _released(hold: _Hold, covered: bool, now: dt.datetime) -> bool:
    """Whether what held this alert back has ended: its shelving, or (the device relabelled,
    a window ended or removed) every window that covered it. No window holds a closed alert
    back (`announce`); the mark one kept from an older version goes at the next sweep."""
    if hold.shelved_until:
        return dt.datetime.fromisoformat(hold.shelved_until) <= now
    return bool(hold.suppressed_by) and not (AlertState(hold.state).active and covered)


def _unshelved(doc: dict[str, Any], by: str, now: dt.datetime) -> dict[str, Any]:
    text = f"unshelved by {by}" if by else "shelving ended"
    notes = [*doc.get("notes", []), [now.isoformat(), by or "control-plane", text]]
    return {**doc, "shelved_until": None, "shelved_by": "", "shelve_reason": "", "notes": notes}


def _alert(r: AlertRow) -> AlertRecord:
    doc = r.doc
    shelved = doc.get("shelved_until")
    return AlertRecord(
        id=r.id,
        device_id=r.device_id,
        asset=r.asset,
        fault=r.fault,
        state=AlertState(r.state),
        peak_score=float(doc.get("peak_score", 0.0)),
        top_sensors=tuple((str(n), float(v)) for n, v in doc.get("top_sensors", [])),
        first_seen=r.first_seen,
        last_seen=r.last_seen,
        resolved_at=r.resolved_at,
        resolved_by=str(doc.get("resolved_by", "")),
        notes=tuple(
            AlertNote(dt.datetime.fromisoformat(at), by, text)
            for at, by, text in doc.get("notes", [])
        ),
        model_version=str(doc.get("model_version", "")),
        raised_events=int(doc.get("raised_events", 0)),
        revision=r.revision,
        verdict=str(doc.get("verdict", "")),
        fault_type=str(doc.get("fault_type", "")),
        acknowledged_by=str(doc.get("acknowledged_by", "")),
        shelved_until=dt.datetime.fromisoformat(shelved) if shelved else None,
        shelved_by=str(doc.get("shelved_by", "")),
        shelve_reason=str(doc.get("shelve_reason", "")),
        suppressed_by=str(doc.get("suppressed_by", "")),
        opening_score=float(doc.get("opening_score", doc.get("peak_score", 0.0))),
        opening_model_version=str(doc.get("opening_model_version", doc.get("model_version", ""))),
    )


MIN_ID_PREFIX = 4
_ID_PREFIX = re.compile(r"^[0-9a-f-]+$")


def _full_alert_id(s: Session, alert_id: str) -> str:
    """`alert_id` itself, or the one alert whose id starts with it (as `alerts list` shows
    ids shortened); several: an error naming them."""
    if s.get(AlertRow, alert_id) is not None or len(alert_id) < MIN_ID_PREFIX:
        return alert_id
    if not _ID_PREFIX.match(alert_id):
        return alert_id
    ids = s.scalars(
        select(AlertRow.id).where(AlertRow.id.startswith(alert_id, autoescape=True)).limit(3)
    ).all()
    if len(ids) > 1:
        shown = ", ".join(ids[:2]) + (", ..." if len(ids) > 2 else "")
        raise InvalidInput(f"alert id '{alert_id}' is ambiguous ({shown}); give more of it")
    return ids[0] if ids else alert_id
