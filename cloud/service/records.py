"""Records devices sync (predictions, alert events, window captures): wire messages -> domain
records -> store.

The wire side of syncing: each record is checked against its bounds and turned into a domain
record here; the store never sees a protobuf message."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from cloud.captures import CALIBRATION_FIELDS, CaptureCalibration, CaptureRecord, check_capture
from cloud.domain import AlertEventRecord, PredictionRecord, PredictionRow, StoredCount
from cloud.service.bounds import MAX_INT64, RecordTimes, check_message
from cloud.service.record_rows import prediction_row
from cloud.store.base import RecordStore
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
_KINDS = {
    agent_pb2.AlertEvent.KIND_RAISED: "raised",
    agent_pb2.AlertEvent.KIND_CLEARED: "cleared",
}
_REASONS = {
    agent_pb2.WindowCapture.REASON_ALERT: "alert",
    agent_pb2.WindowCapture.REASON_SAMPLE: "sample",
}
DomainRecord = PredictionRecord | AlertEventRecord | CaptureRecord


def _time(stamp: object) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)  # type: ignore[attr-defined,no-any-return]


def _record(device_id: str, record: agent_pb2.Record, where: str) -> DomainRecord:
    """The domain record of one synced record; InvalidInput says what is wrong with it."""
    check_message(record, where)
    if record.sequence == 0:
        raise InvalidInput(f"{where}: a synced record has no sequence number")
    kind = record.WhichOneof("body")
    if kind == "prediction":
        p = record.prediction
        return PredictionRecord(
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
    if kind == "alert":
        a = record.alert
        if a.kind not in _KINDS:
            raise InvalidInput(f"{where}: alert event without a kind")
        return AlertEventRecord(
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
    if kind == "capture":
        return capture_from_proto(device_id, record.sequence, record.capture, f"{where}.capture")
    raise InvalidInput(f"{where}: carries no prediction, alert event or window capture")


def capture_from_proto(
    device_id: str, sequence: int, c: agent_pb2.WindowCapture, where: str
) -> CaptureRecord:
    """The domain capture, checked (`cloud.captures.check_capture`)."""
    capture = CaptureRecord(
        device_id=device_id,
        sequence=sequence,
        reason=_REASONS.get(c.reason, ""),
        asset=c.asset,
        model_version=c.model_version,
        alert_key=c.alert_key,
        score=c.score,
        window_start=_time(c.window_start),
        period_s=c.period_seconds,
        length=c.length,
        sensors=tuple(c.sensors),
        values=c.values,
        mask=c.mask,
        input_center=tuple(c.input_center),
        input_scale=tuple(c.input_scale),
        calibration=calibration_from_proto(c.calibration) if c.HasField("calibration") else None,
    )
    check_capture(capture, where)
    return capture


def calibration_from_proto(c: agent_pb2.DecisionCalibration) -> CaptureCalibration:
    return CaptureCalibration(**{name: tuple(getattr(c, name)) for name in CALIBRATION_FIELDS})


def calibration_to_proto(c: CaptureCalibration) -> agent_pb2.DecisionCalibration:
    return agent_pb2.DecisionCalibration(**{name: getattr(c, name) for name in CALIBRATION_FIELDS})


@dataclass
class SplitBatch:
    predictions: list[PredictionRecord] = field(default_factory=list)
    alerts: list[AlertEventRecord] = field(default_factory=list)
    captures: list[CaptureRecord] = field(default_factory=list)
    rejected: list[agent_pb2.RejectedRecord] = field(default_factory=list)
    prediction_rows: list[PredictionRow] = field(default_factory=list)
    up_to: int = 0  # the highest sequence number of the batch that fits a store column


def split_batch(
    device_id: str, batch: agent_pb2.RecordBatch, now: dt.datetime | None = None
) -> SplitBatch:
    """Domain records of a batch received at `now`, and the records refused with the reason
    (a field out of its bounds, a time out of `RecordTimes`' range, a repeated sequence
    number): one bad record never holds up the others. `now` None: the times are not
    checked (for tests of the conversion alone).

    Predictions within their bounds become store rows straight from the wire
    (`prediction_row`, `RecordTimes.fits`); anything else, or a prediction a quick check does
    not pass, goes the general way (`check_message`, a domain record, `RecordTimes.check`),
    which also words the refusal."""
    split = SplitBatch()
    seen: set[int] = set()
    rows = split.prediction_rows
    times = None if now is None else RecordTimes.received_at(now)
    for i, record in enumerate(batch.records):
        sequence = record.sequence
        if 0 < sequence <= MAX_INT64:
            if sequence > split.up_to:
                split.up_to = sequence
            if (
                sequence not in seen
                and (row := prediction_row(device_id, record)) is not None
                and (times is None or _window_fits(times, record.prediction))
            ):
                seen.add(sequence)
                rows.append(row)
                continue
        where = f"records[{i}] (sequence {sequence})"
        try:
            if sequence in seen:
                raise InvalidInput(f"{where}: the sequence number repeats in the batch")
            domain = _record(device_id, record, where)
            if times is not None:
                times.check(record, where)
        except InvalidInput as exc:
            split.rejected.append(
                agent_pb2.RejectedRecord(sequence=record.sequence, reason=str(exc)[:500])
            )
            continue
        seen.add(record.sequence)
        if isinstance(domain, PredictionRecord):
            split.predictions.append(domain)
        elif isinstance(domain, CaptureRecord):
            split.captures.append(domain)
        else:
            split.alerts.append(domain)
    return split


def _window_fits(times: RecordTimes, p: agent_pb2.Prediction) -> bool:
    start, end = p.window_start, p.window_end
    return times.fits((start.seconds, start.nanos), (end.seconds, end.nanos))


def store_batch(
    store: RecordStore, device_id: str, batch: agent_pb2.RecordBatch, now: dt.datetime
) -> tuple[agent_pb2.BatchAck, int]:
    """Stores a batch (alert events fold into alerts in the same transaction); the ack for
    the device and how many alerts changed. Rejected records are acknowledged with the rest
    (the agent quarantines them), and the stored position moves past them; so are captures
    past the device's daily budget (`cloud.capture_budget`), charged in the transaction that
    stores them: a batch that fails to store is not charged, and its resend is charged once."""
    split = split_batch(device_id, batch, now)
    up_to = split.up_to
    counted: StoredCount = store.store_records(
        device_id,
        split.predictions,
        split.alerts,
        now,
        through=up_to,
        captures=split.captures,
        prediction_rows=split.prediction_rows,
    )
    split.rejected += [
        agent_pb2.RejectedRecord(sequence=q, reason=r) for q, r in sorted(counted.refused.items())
    ]
    if split.rejected:
        log.warning(
            "device %s: %d record(s) rejected; first: %s",
            device_id,
            len(split.rejected),
            split.rejected[0].reason,
        )
    ack = agent_pb2.BatchAck(
        up_to_sequence=up_to or counted.last_sequence,
        stored=counted.stored,
        duplicates=counted.duplicates,
        rejected=split.rejected,
    )
    return ack, counted.alerts_changed
