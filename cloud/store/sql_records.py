"""Predictions and alert events synced from devices, in SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import select

from cloud.domain import (
    AlertEventRecord,
    PredictionRecord,
    StoredCount,
)
from cloud.store.sql_alerts import apply_alert_events
from cloud.store.sql_base import SqlBase
from cloud.store.tables import (
    AlertEventRow,
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
    ) -> StoredCount:
        sequences = [p.sequence for p in predictions] + [a.sequence for a in alerts]
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
            existing: set[int] = set()
            if sequences:
                for table in (PredictionRow, AlertEventRow):
                    existing.update(
                        s.scalars(
                            select(table.sequence).where(
                                table.device_id == device_id, table.sequence.in_(sequences)
                            )
                        ).all()
                    )
            new_predictions = [p for p in predictions if p.sequence not in existing]
            new_alerts = [a for a in alerts if a.sequence not in existing]
            s.add_all(_prediction_row(p, now) for p in new_predictions)
            s.add_all(_alert_row(a, now) for a in new_alerts)
            changed = apply_alert_events(s, new_alerts, now)  # same transaction: exactly once
            sync.last_sequence = max(sync.last_sequence, through, *sequences)
            stored = len(new_predictions) + len(new_alerts)
            return StoredCount(stored, len(sequences) - stored, sync.last_sequence, len(changed))

    def last_record_sequence(self, device_id: str) -> int:
        with self._tx() as s:
            sync = s.get(DeviceSyncRow, device_id)
            return sync.last_sequence if sync is not None else 0

    def list_predictions(
        self, device_id: str, asset: str = "", since: dt.datetime | None = None, limit: int = 1000
    ) -> list[PredictionRecord]:
        query = select(PredictionRow).where(PredictionRow.device_id == device_id)
        if asset:
            query = query.where(PredictionRow.asset == asset)
        if since is not None:
            query = query.where(PredictionRow.window_end >= since)
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


def _prediction_row(p: PredictionRecord, now: dt.datetime) -> PredictionRow:
    return PredictionRow(
        device_id=p.device_id,
        sequence=p.sequence,
        asset=p.asset,
        window_start=p.window_start,
        window_end=p.window_end,
        score=p.score,
        anomalous=p.anomalous,
        model_version=p.model_version,
        contributions=dict(p.contributions),
        received_at=now,
    )


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


def _alert_row(a: AlertEventRecord, now: dt.datetime) -> AlertEventRow:
    return AlertEventRow(
        device_id=a.device_id,
        sequence=a.sequence,
        alert_key=a.alert_key,
        kind=a.kind,
        asset=a.asset,
        fault=a.fault,
        score=a.score,
        top_sensors=[[name, value] for name, value in a.top_sensors],
        window_start=a.window_start,
        window_end=a.window_end,
        raised_at=a.raised_at,
        model_version=a.model_version,
        received_at=now,
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
