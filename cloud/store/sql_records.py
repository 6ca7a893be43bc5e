"""Predictions, alert events and window captures synced from devices, in SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud.captures import CaptureRecord
from cloud.domain import (
    AlertEventRecord,
    PredictionRecord,
    StoredCount,
)
from cloud.store.sql_alerts import apply_alert_events
from cloud.store.sql_base import SqlBase
from cloud.store.tables import (
    AlertEventRow,
    Base,
    CaptureRow,
    DeviceRow,
    DeviceSyncRow,
    PredictionRow,
)
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
    ) -> StoredCount:
        sequences = [p.sequence for p in predictions] + [a.sequence for a in alerts]
        sequences += [c.sequence for c in captures]
        if len(set(sequences)) != len(sequences):
            raise InvalidInput("a record batch repeats a sequence number")
        with self._tx() as s:
            sync = s.get(DeviceSyncRow, device_id, with_for_update=True)
            if sync is None:
                if s.get(DeviceRow, device_id) is None:
                    raise NotFound(f"no device with id '{device_id}'")
                sync = DeviceSyncRow(device_id=device_id, last_sequence=0)
                s.add(sync)
                s.flush()
            # One INSERT ... ON CONFLICT DO NOTHING per table, the rows built as plain values
            # (no ORM objects): RETURNING says which sequences were new, so records resent
            # after a reconnect count as duplicates and alert events fold exactly once.
            stored_predictions = _insert_new(
                s, PredictionRow, [_prediction_values(p, now) for p in predictions]
            )
            stored_alerts = _insert_new(s, AlertEventRow, [_alert_values(a, now) for a in alerts])
            stored_captures = _insert_new(s, CaptureRow, [capture_values(c, now) for c in captures])
            new_alerts = [a for a in alerts if a.sequence in stored_alerts]
            changed = apply_alert_events(s, new_alerts, now)  # same transaction: exactly once
            sync.last_sequence = max(sync.last_sequence, through, *sequences)
            stored = len(stored_predictions) + len(stored_alerts) + len(stored_captures)
            return StoredCount(stored, len(sequences) - stored, sync.last_sequence, len(changed))

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
    ) -> list[PredictionRecord]:
        query = select(PredictionRow).where(PredictionRow.device_id == device_id)
        if asset:
            query = query.where(PredictionRow.asset == asset)
        if since is not None:
            query = query.where(PredictionRow.window_end >= since)
        if until is not None:
            query = query.where(PredictionRow.window_end <= until)
        query = query.order_by(PredictionRow.sequence.desc()).limit(limit)
        with self._tx() as s:
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
        with self._tx() as s:
            return [_alert(r) for r in s.scalars(query).all()]


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


def _prediction_values(p: PredictionRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "device_id": p.device_id,
        "sequence": p.sequence,
        "asset": p.asset,
        "window_start": p.window_start,
        "window_end": p.window_end,
        "score": p.score,
        "anomalous": p.anomalous,
        "model_version": p.model_version,
        "contributions": dict(p.contributions),
        "received_at": now,
    }


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


def _prediction(r: PredictionRow) -> PredictionRecord:
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
