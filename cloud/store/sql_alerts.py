"""Alerts in SQL: edge raise/clear events grouped into alerts, and the operator lifecycle.

A raise opens an alert for its (device, asset, fault) group, or folds into the open one
(peak score, last seen, top sensors of the peak); a clear resolves the open one. Events
arrive at most once (the record sync is idempotent per device and sequence) and are applied
in the transaction that stores them, so a crash cannot apply an event twice or lose it.
Every change takes the next revision from a one-row counter, locked in the transaction:
watch streams and deliveries follow revisions, not clocks. Webhook deliveries are queued in
the same transaction (`enqueue_deliveries`).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.domain import AlertEventRecord, AlertFilter, AlertNote, AlertRecord, AlertState
from cloud.store.sql_base import SqlBase
from cloud.store.sql_webhooks import enqueue_deliveries
from cloud.store.tables import AlertRevisionRow, AlertRow
from edge_agent.errors import FailedPrecondition, InvalidInput, NotFound

MAX_NOTE = 2000


def _next_revision(s: Session) -> int:
    counter = s.get(AlertRevisionRow, 1, with_for_update=True)
    assert counter is not None, "migration 0004 creates the counter row"
    counter.value += 1
    return counter.value


def _open_key(device_id: str, asset: str, fault: str) -> str:
    return f"{device_id}/{asset}/{fault}"


def apply_alert_events(
    s: Session, events: Sequence[AlertEventRecord], now: dt.datetime
) -> list[AlertRecord]:
    """Folds newly stored edge events into alerts (in `s`'s transaction); the changed alerts."""
    changed: dict[str, AlertRow] = {}
    for event in sorted(events, key=lambda e: e.sequence):
        key = _open_key(event.device_id, event.asset, event.fault)
        row = s.scalars(select(AlertRow).where(AlertRow.open_key == key)).first()
        if event.kind != "raised" and row is None:
            continue  # cleared, but an operator resolved it first
        revision = _next_revision(s)  # before the new row exists: autoflush must not see it
        if event.kind == "raised":
            if row is None:
                row = AlertRow(
                    id=str(uuid.uuid4()),
                    device_id=event.device_id,
                    asset=event.asset,
                    fault=event.fault,
                    state=AlertState.FIRING.value,
                    open_key=key,
                    revision=revision,
                    first_seen=event.raised_at,
                    last_seen=event.window_end,
                    resolved_at=None,
                    doc={
                        "peak_score": event.score,
                        "top_sensors": [[n, v] for n, v in event.top_sensors],
                        "notes": [],
                        "model_version": event.model_version,
                        "raised_events": 1,
                        "resolved_by": "",
                        "edge_keys": [event.alert_key],
                    },
                )
                s.add(row)
            else:
                doc = dict(row.doc)
                doc["raised_events"] = int(doc.get("raised_events", 0)) + 1
                if event.score > float(doc.get("peak_score", 0.0)):
                    doc["peak_score"] = event.score
                    doc["top_sensors"] = [[n, v] for n, v in event.top_sensors]
                if event.alert_key not in doc.get("edge_keys", []):
                    doc["edge_keys"] = [*doc.get("edge_keys", []), event.alert_key][-20:]
                doc["model_version"] = event.model_version
                row.doc = doc
                row.last_seen = max(row.last_seen, event.window_end)
        else:
            assert row is not None
            row.state = AlertState.RESOLVED.value
            row.open_key = None
            row.resolved_at = event.window_end
            row.last_seen = max(row.last_seen, event.window_end)
            row.doc = {**row.doc, "resolved_by": "edge"}
        row.revision = revision
        s.flush()
        changed[row.id] = row
    alerts = [_alert(r) for r in changed.values()]
    enqueue_deliveries(s, alerts, now)
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
        query = query.order_by(AlertRow.last_seen.desc(), AlertRow.revision.desc()).limit(limit)
        with self._tx() as s:
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
        self, alert_id: str, action: str, note: str, by: str, now: dt.datetime
    ) -> AlertRecord:
        if action not in ("ack", "resolve"):
            raise InvalidInput(f"unknown alert action {action!r}")
        if len(note) > MAX_NOTE:
            raise InvalidInput(f"a note holds at most {MAX_NOTE} characters, got {len(note)}")
        with self._tx() as s:
            alert_id = _full_alert_id(s, alert_id)
            row = s.get(AlertRow, alert_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no alert with id '{alert_id}'")
            if row.state == AlertState.RESOLVED.value:
                raise FailedPrecondition(
                    f"alert {alert_id} is resolved (by {row.doc.get('resolved_by') or '?'}); "
                    "nothing to acknowledge or resolve"
                )
            revision = _next_revision(s)
            doc: dict[str, Any] = dict(row.doc)
            if note:
                doc["notes"] = [*doc.get("notes", []), [now.isoformat(), by, note]]
            if action == "ack":
                row.state = AlertState.ACKNOWLEDGED.value
            else:
                row.state = AlertState.RESOLVED.value
                row.open_key = None
                row.resolved_at = now
                doc["resolved_by"] = by
            row.doc = doc
            row.revision = revision
            s.flush()
            alert = _alert(row)
            enqueue_deliveries(s, [alert], now)
            return alert


def _alert(r: AlertRow) -> AlertRecord:
    doc = r.doc
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
