"""Records devices sync (predictions, alert events): wire messages -> domain records -> store."""

from __future__ import annotations

import datetime as dt

from cloud.domain import AlertEventRecord, PredictionRecord, StoredCount
from cloud.store import Store
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2

_KINDS = {
    agent_pb2.AlertEvent.KIND_RAISED: "raised",
    agent_pb2.AlertEvent.KIND_CLEARED: "cleared",
}


def _time(stamp: object) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)  # type: ignore[attr-defined,no-any-return]


def split_batch(
    device_id: str, batch: agent_pb2.RecordBatch
) -> tuple[list[PredictionRecord], list[AlertEventRecord]]:
    """Domain records of a batch; InvalidInput names the first bad record."""
    predictions: list[PredictionRecord] = []
    alerts: list[AlertEventRecord] = []
    for record in batch.records:
        if record.sequence == 0:
            raise InvalidInput("a synced record has no sequence number")
        kind = record.WhichOneof("body")
        if kind == "prediction":
            p = record.prediction
            predictions.append(
                PredictionRecord(
                    device_id=device_id,
                    sequence=record.sequence,
                    asset=p.asset,
                    window_start=_time(p.window_start),
                    window_end=_time(p.window_end),
                    score=p.score,
                    anomalous=p.anomalous,
                    model_version=p.model_version,
                    contributions=dict(p.contributions),
                )
            )
        elif kind == "alert":
            a = record.alert
            if a.kind not in _KINDS:
                raise InvalidInput(f"record {record.sequence}: alert event without a kind")
            alerts.append(
                AlertEventRecord(
                    device_id=device_id,
                    sequence=record.sequence,
                    alert_key=a.alert_key,
                    kind=_KINDS[a.kind],
                    asset=a.asset,
                    fault=a.fault or "anomaly",
                    score=a.score,
                    top_sensors=[(s.sensor, s.contribution) for s in a.top_sensors],
                    window_start=_time(a.window_start),
                    window_end=_time(a.window_end),
                    raised_at=_time(a.raised_at),
                    model_version=a.model_version,
                )
            )
        else:
            raise InvalidInput(
                f"record {record.sequence} carries neither a prediction nor an alert"
            )
    return predictions, alerts


def store_batch(
    store: Store, device_id: str, batch: agent_pb2.RecordBatch, now: dt.datetime
) -> tuple[agent_pb2.BatchAck, int]:
    """Stores a batch (alert events fold into alerts in the same transaction); the ack for
    the device and how many alerts changed."""
    predictions, alerts = split_batch(device_id, batch)
    counted: StoredCount = store.store_records(device_id, predictions, alerts, now)
    up_to = max((r.sequence for r in batch.records), default=counted.last_sequence)
    ack = agent_pb2.BatchAck(
        up_to_sequence=up_to, stored=counted.stored, duplicates=counted.duplicates
    )
    return ack, counted.alerts_changed
