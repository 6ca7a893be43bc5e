"""The agent's records on the wire: predictions, alert events and window captures as the
outbox keeps them (serialized `Record` bodies, the sequence added when sent)."""

from __future__ import annotations

import math

import numpy as np

from edge_agent.calibration import SiteCalibration
from edge_agent.capture import ALERT, CapturedWindow, masked_values
from edge_agent.decisions import AlertEvent, Verdict
from edge_agent.losses import LostStretch
from edge_agent.windowing import FloatArray
from protos.autoglm.v1 import agent_pb2


def _stamp(message: object, seconds: float) -> None:
    """Seconds and nanoseconds apart: `round(seconds * 1e9)` loses the microseconds of an
    epoch time to float rounding (...56.25 arrived as ...56.249999)."""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    message.seconds = whole  # type: ignore[attr-defined]
    message.nanos = nanos  # type: ignore[attr-defined]


def prediction_record(verdict: Verdict, model_version: str) -> bytes:
    record = agent_pb2.Record(
        prediction=agent_pb2.Prediction(
            asset=verdict.asset,
            score=verdict.score,
            anomalous=verdict.alerting,
            model_version=model_version,
            contributions={k: round(v, 4) for k, v in verdict.contributions.items()},
        )
    )
    _stamp(record.prediction.window_start, verdict.window_start)
    _stamp(record.prediction.window_end, verdict.window_end)
    return record.SerializeToString()


def alert_record(event: AlertEvent) -> bytes:
    kind = (
        agent_pb2.AlertEvent.KIND_RAISED
        if event.kind == "raised"
        else agent_pb2.AlertEvent.KIND_CLEARED
    )
    record = agent_pb2.Record(
        alert=agent_pb2.AlertEvent(
            alert_key=event.key,
            kind=kind,
            asset=event.asset,
            fault=event.fault,
            score=event.score,
            top_sensors=[
                agent_pb2.SensorContribution(sensor=s, contribution=c) for s, c in event.top_sensors
            ],
            model_version=event.model_version,
        )
    )
    _stamp(record.alert.window_start, event.window_start)
    _stamp(record.alert.window_end, event.window_end)
    _stamp(record.alert.raised_at, event.raised_at)
    return record.SerializeToString()


def lost_records(stretches: list[LostStretch]) -> list[agent_pb2.LostRecords]:
    """The heartbeat's account of records the outbox could not keep."""
    out = []
    for s in stretches:
        message = agent_pb2.LostRecords(records=s.records, ongoing=s.ongoing, reason=s.reason)
        _stamp(message.first, s.first)
        _stamp(message.last, s.last)
        out.append(message)
    return out


def capture_record(window: CapturedWindow) -> bytes:
    """A window capture: values as little-endian float32, the mask as packed bits."""
    reason = (
        agent_pb2.WindowCapture.REASON_ALERT
        if window.reason == ALERT
        else agent_pb2.WindowCapture.REASON_SAMPLE
    )
    mask = np.asarray(window.mask) > 0
    record = agent_pb2.Record(
        capture=agent_pb2.WindowCapture(
            reason=reason,
            asset=window.asset,
            model_version=window.model_version,
            alert_key=window.alert_key,
            score=window.score,
            period_seconds=window.period_s,
            length=int(mask.shape[0]),
            sensors=window.sensors,
            values=masked_values(window.values, window.mask).astype("<f4").tobytes(),
            mask=np.packbits(mask.reshape(-1)).tobytes(),
            input_center=[float(x) for x in window.input_center],
            input_scale=[float(x) for x in window.input_scale],
        )
    )
    if window.calibration is not None:
        record.capture.calibration.CopyFrom(decision_calibration(window.calibration))
    _stamp(record.capture.window_start, window.window_start)
    return record.SerializeToString()


def decision_calibration(cal: SiteCalibration) -> agent_pb2.DecisionCalibration:
    """What the decision reads of a site calibration besides the input normalisation."""

    def floats(vector: FloatArray | None) -> list[float]:
        return [] if vector is None else [float(x) for x in np.asarray(vector).reshape(-1)]

    return agent_pb2.DecisionCalibration(
        residual_scale=floats(cal.residual_scale),
        level_center=floats(cal.level_center),
        level_scale=floats(cal.level_scale),
        spread_center=floats(cal.spread_center),
        level_precision=floats(cal.level_precision),
        subspace_center=floats(cal.subspace_center),
        subspace_basis=floats(cal.subspace_basis),  # [N, k] row-major
        subspace_scale=floats(cal.subspace_scale),
    )
