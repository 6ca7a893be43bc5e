"""Predictions, alert events and window captures synced from devices, in SQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud.capture_budget import CaptureBudget
from cloud.captures import CaptureRecord
from cloud.domain import (
    AlertEventRecord,
    PredictionRecord,
    PredictionRow,
    StoredCount,
)
from cloud.store.sql_alerts import apply_alert_events
from cloud.store.sql_base import SqlBase
from cloud.store.sql_captures import charge_in
from cloud.store.tables import (
    AlertEventRow,
    Base,
    CaptureRow,
    DeviceRow,
    DeviceSyncRow,
)
from cloud.store.tables import PredictionRow as PredictionTable
from edge_agent.errors import (
    InvalidInput,
    NotFound,
)


class RecordTables(SqlBase):
    """The synced-records part of `Store`."""

    def store_records(
        self,
        device_id: str,
        predictions: Sequence[PredictionRecord],
        alerts: Sequence[AlertEventRecord],
        now: dt.datetime,
        through: int = 0,
        captures: Sequence[CaptureRecord] = (),
        prediction_rows: Sequence[PredictionRow] = (),
        budget: CaptureBudget | None = None,
    ) -> StoredCount:
        rows = [prediction_row(p) for p in predictions]
        rows += prediction_rows
        sequences = [r[1] for r in rows] + [a.sequence for a in alerts]
        sequences += [c.sequence for c in captures]
        if len(set(sequences)) != len(sequences):
            raise InvalidInput("a record batch repeats a sequence number")
        with self._tx() as s:
            sync = _locked_sync(s, device_id)
            # Charged in this transaction: if the batch fails to store, the charge is rolled
            # back with it, and the agent's resend is charged once.
            refused = charge_in(s, device_id, captures, now, budget)
            if refused:
                captures = [c for c in captures if c.sequence not in refused]
            # One INSERT ... ON CONFLICT DO NOTHING per table, the rows built as plain values
            # (no ORM objects): RETURNING says which sequences were new, so records resent
            # after a reconnect count as duplicates and alert events fold exactly once.
            stored_predictions = _insert_predictions(s, device_id, rows, now)
            stored_alerts = _insert_new(s, AlertEventRow, [_alert_values(a, now) for a in alerts])
            stored_captures = _insert_new(s, CaptureRow, [capture_values(c, now) for c in captures])
            new_alerts = [a for a in alerts if a.sequence in stored_alerts]
            changed = apply_alert_events(s, new_alerts, now)  # same transaction: exactly once
            sync.last_sequence = max(sync.last_sequence, through, *sequences)
            stored = stored_predictions + len(stored_alerts) + len(stored_captures)
            duplicates = len(sequences) - len(refused) - stored
            return StoredCount(
                stored, duplicates, sync.last_sequence, len(changed), refused=refused
            )

    def last_record_sequence(self, device_id: str) -> int:
        with self._tx() as s:
            sync = s.get(DeviceSyncRow, device_id)
            return sync.last_sequence if sync is not None else 0

    def list_predictions(
        self,
        device_id: str,
        asset: str = "",
        since: dt.datetime | None = None,
        limit: int = 1000,
        until: dt.datetime | None = None,
        before_sequence: int = 0,
    ) -> list[PredictionRecord]:
        query = select(PredictionTable).where(PredictionTable.device_id == device_id)
        if before_sequence > 0:
            query = query.where(PredictionTable.sequence < before_sequence)
        if asset:
            query = query.where(PredictionTable.asset == asset)
        if since is not None:
            query = query.where(PredictionTable.window_end >= since)
        if until is not None:
            query = query.where(PredictionTable.window_end <= until)
        query = query.order_by(PredictionTable.sequence.desc()).limit(limit)
        with self._read_tx() as s:
            rows = list(s.scalars(query).all())
        return [_prediction(r) for r in reversed(rows)]

    def list_alert_events(
        self, device_id: str = "", since: dt.datetime | None = None, limit: int = 1000
    ) -> list[AlertEventRecord]:
        query = select(AlertEventRow)
        if device_id:
            query = query.where(AlertEventRow.device_id == device_id)
        if since is not None:
            query = query.where(AlertEventRow.received_at >= since)
        query = query.order_by(AlertEventRow.device_id, AlertEventRow.sequence).limit(limit)
        with self._read_tx() as s:
            return [_alert(r) for r in s.scalars(query).all()]


def _locked_sync(s: Session, device_id: str) -> DeviceSyncRow:
    """The device's sync row, locked to the end of the transaction; made on its first batch
    with INSERT ... ON CONFLICT DO NOTHING, then locked and read. The first batch may be
    stored by two sessions at once (its old one on one replica, its new one on another), and
    FOR UPDATE on a row not there yet locks nothing: both inserted it, and one failed on the
    primary key (an internal error, the batch unacknowledged)."""
    sync = s.get(DeviceSyncRow, device_id, with_for_update=True)
    if sync is not None:
        return sync
    # FOR KEY SHARE: the device is not deleted (its rows with it) before this commits; its
    # other updates (presence) go on beside.
    if s.get(DeviceRow, device_id, with_for_update={"key_share": True}) is None:
        raise NotFound(f"no device with id '{device_id}'")
    dialect = s.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    s.execute(
        insert(DeviceSyncRow)
        .values(device_id=device_id, last_sequence=0)
        .on_conflict_do_nothing(index_elements=["device_id"])
    )  # waits for another transaction inserting it, then leaves its row
    sync = s.get(DeviceSyncRow, device_id, with_for_update=True)
    if sync is None:  # cannot be, the device locked: said as what it would mean
        raise NotFound(f"no device with id '{device_id}'")
    return sync


def _insert_new(s: Session, table: type[Base], rows: list[dict[str, Any]]) -> set[int]:
    """Inserts the rows whose (device, sequence) is not stored yet; their sequences."""
    if not rows:
        return set()
    dialect = s.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert(table)
        .on_conflict_do_nothing(index_elements=["device_id", "sequence"])
        .returning(table.sequence)  # type: ignore[attr-defined]
    )
    return set(s.scalars(statement, rows).all())


# Predictions are the bulk of what devices sync: stored with one statement per batch on the
# driver's own connection (same transaction), from plain row tuples, with no per-row work in
# SQLAlchemy. The stored forms are the ones the mapped columns read back: on SQLite
# UTCDateTime is text 'YYYY-MM-DD HH:MM:SS.ffffff' (made by SQLite itself here) and JSON is
# text; on PostgreSQL, timestamptz and json. ON CONFLICT DO NOTHING keeps the first copy of
# a (device, sequence); the rows inserted are counted, the rest are duplicates.
_SQLITE_TIME = "strftime('%Y-%m-%d %H:%M:%S', ?, 'unixepoch') || printf('.%06d', ?)"
_SQLITE_PREDICTIONS = (
    "INSERT INTO predictions (device_id, sequence, asset, window_start, window_end, score, "
    f"anomalous, model_version, contributions, received_at) VALUES (?, ?, ?, {_SQLITE_TIME}, "
    f"{_SQLITE_TIME}, ?, ?, ?, ?, ?) ON CONFLICT (device_id, sequence) DO NOTHING"
)
_POSTGRES_PREDICTIONS = (
    "INSERT INTO predictions (device_id, sequence, asset, window_start, window_end, score, "
    "anomalous, model_version, contributions, received_at) "
    "SELECT %s, u.sequence, u.asset, u.window_start, u.window_end, u.score, u.anomalous, "
    "u.model_version, u.contributions::json, %s FROM unnest(%b::bigint[], %b::text[], "
    "%b::timestamptz[], %b::timestamptz[], %b::float8[], %b::boolean[], %b::text[], "
    "%b::text[]) AS u(sequence, asset, window_start, window_end, score, anomalous, "
    "model_version, contributions) ON CONFLICT (device_id, sequence) DO NOTHING"
)  # %b: the arrays go in binary (in text, psycopg escapes every element with a regex)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SQLITE_NOW = "%Y-%m-%d %H:%M:%S.%f"


def _insert_predictions(
    s: Session, device_id: str, rows: Sequence[PredictionRow], now: dt.datetime
) -> int:
    """Inserts the rows whose (device, sequence) is not stored yet; how many were new."""
    if not rows:
        return 0
    if any(r[0] != device_id for r in rows):
        raise InvalidInput("a prediction of another device in the batch")
    connection = s.connection()
    if connection.dialect.name == "postgresql":
        since = dt.timedelta
        columns = (
            [r[1] for r in rows],
            [r[2] for r in rows],
            [_EPOCH + since(0, r[3], r[4]) for r in rows],
            [_EPOCH + since(0, r[5], r[6]) for r in rows],
            [r[7] for r in rows],
            [r[8] for r in rows],
            [r[9] for r in rows],
            [r[10] for r in rows],
        )
        result = connection.exec_driver_sql(_POSTGRES_PREDICTIONS, (device_id, now, *columns))
        return int(result.rowcount)
    received = now.astimezone(dt.UTC).strftime(_SQLITE_NOW)
    result = connection.exec_driver_sql(_SQLITE_PREDICTIONS, [(*r, received) for r in rows])
    return int(result.rowcount)


def prediction_row(p: PredictionRecord) -> PredictionRow:
    """The row of a domain prediction (what the sync path builds straight from the wire)."""
    start, end = p.window_start - _EPOCH, p.window_end - _EPOCH
    return (
        p.device_id,
        p.sequence,
        p.asset,
        start.days * 86_400 + start.seconds,
        start.microseconds,
        end.days * 86_400 + end.seconds,
        end.microseconds,
        p.score,
        p.anomalous,
        p.model_version,
        json.dumps(dict(p.contributions)),
    )


def _alert_values(a: AlertEventRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "device_id": a.device_id,
        "sequence": a.sequence,
        "alert_key": a.alert_key,
        "kind": a.kind,
        "asset": a.asset,
        "fault": a.fault,
        "score": a.score,
        "top_sensors": [[name, value] for name, value in a.top_sensors],
        "window_start": a.window_start,
        "window_end": a.window_end,
        "raised_at": a.raised_at,
        "model_version": a.model_version,
        "received_at": now,
    }


def capture_values(c: CaptureRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "device_id": c.device_id,
        "sequence": c.sequence,
        "reason": c.reason,
        "asset": c.asset,
        "model_version": c.model_version,
        "alert_key": c.alert_key,
        "score": c.score,
        "window_start": c.window_start,
        "window_end": c.window_end,
        "period_s": c.period_s,
        "length": c.length,
        "sensors": list(c.sensors),
        "values": c.values,
        "mask": c.mask,
        "input_center": list(c.input_center),
        "input_scale": list(c.input_scale),
        "received_at": now,
        "calibration": None if c.calibration is None else c.calibration.as_doc(),
    }


def _prediction(r: PredictionTable) -> PredictionRecord:
    return PredictionRecord(
        device_id=r.device_id,
        sequence=r.sequence,
        asset=r.asset,
        window_start=r.window_start,
        window_end=r.window_end,
        score=r.score,
        anomalous=r.anomalous,
        model_version=r.model_version,
        contributions=dict(r.contributions),
    )


def _alert(r: AlertEventRow) -> AlertEventRecord:
    return AlertEventRecord(
        device_id=r.device_id,
        sequence=r.sequence,
        alert_key=r.alert_key,
        kind=r.kind,
        asset=r.asset,
        fault=r.fault,
        score=r.score,
        top_sensors=[(str(name), float(value)) for name, value in r.top_sensors],
        window_start=r.window_start,
        window_end=r.window_end,
        raised_at=r.raised_at,
        model_version=r.model_version,
    )
