"""The agent's records as the control plane reads them: what the agent writes into its outbox
(`edge_agent.wire`) arrives as the same prediction and alert event in the cloud's domain
(`cloud.service.records.split_batch`), field by field."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from cloud.service.records import split_batch
from edge_agent.decisions import AlertEvent, Verdict
from edge_agent.wire import alert_record, prediction_record
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit
T = 1_790_000_000.25


def _batch(*bodies: bytes) -> agent_pb2.RecordBatch:
    batch = agent_pb2.RecordBatch()
    for sequence, body in enumerate(bodies, start=1):
        record = batch.records.add()
        record.ParseFromString(body)
        record.sequence = sequence
    return batch


def test_a_prediction_crosses_to_the_cloud_unchanged() -> None:
    verdict = Verdict(
        "pump-1", 1.25, 1.5, True, {"flow": 0.61234, "pressure": 0.2}, T - 24, T, None
    )
    split = split_batch("device-1", _batch(prediction_record(verdict, "7")))
    assert split.rejected == [] and split.alerts == [] and split.predictions == []
    # Predictions go to the store as plain rows (cloud/service/record_rows.py):
    # (device, sequence, asset, start s, start us, end s, end us, score, anomalous, version,
    # contributions as JSON).
    (row,) = split.prediction_rows
    assert row[:3] == ("device-1", 1, "pump-1") and row[9] == "7"
    assert row[7] == pytest.approx(1.25) and row[8] is True
    assert json.loads(row[10]) == pytest.approx({"flow": 0.6123, "pressure": 0.2})
    start = row[3] + row[4] / 1e6
    end = row[5] + row[6] / 1e6
    assert (start, end) == (pytest.approx(T - 24), pytest.approx(T))


@pytest.mark.parametrize("kind", ["raised", "cleared"])
def test_an_alert_event_crosses_to_the_cloud_unchanged(kind: str) -> None:
    event = AlertEvent(
        kind=kind,
        key="pump-1-1790000000250",
        asset="pump-1",
        score=3.5,
        top_sensors=(("vibration", 0.7), ("flow", 0.2)),
        window_start=T - 24,
        window_end=T,
        raised_at=T - 60,
        model_version="7",
        fault="cavitation",
    )
    split = split_batch("device-1", _batch(alert_record(event)))
    (a,) = split.alerts
    assert (a.kind, a.alert_key, a.asset, a.fault, a.model_version) == (
        kind,
        event.key,
        "pump-1",
        "cavitation",
        "7",
    )
    assert a.score == pytest.approx(3.5)
    assert a.top_sensors == [("vibration", pytest.approx(0.7)), ("flow", pytest.approx(0.2))]
    assert a.raised_at == dt.datetime.fromtimestamp(T - 60, dt.UTC)
    assert a.window_end == dt.datetime.fromtimestamp(T, dt.UTC)
