"""QueryPredictions answers that would pass gRPC's message size: the server answers the newest
windows that fit its byte budget and says where the older ones start; the CLI (`alerts show`,
`device predictions`) and the console's client ask for the rest, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.console.api import OperatorApi
from cloud.service.operator_alerts import PREDICTIONS_BUDGET
from cloud.service.records import store_batch
from protos.autoglm.v1 import agent_pb2, operator_pb2, operator_pb2_grpc
from tests.conftest import register
from tests.support.cloud import BACKENDS, RunningPlane, plane_on_backend
from tests.test_cli_e2e import autoglm

pytestmark = [pytest.mark.integration]
T0 = 1_790_000_000
WINDOWS = 1200
SENSORS = 200  # ~9 KB a window: 1,200 of them are ~11 MB, past any gRPC default


@pytest.fixture(params=BACKENDS)
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningPlane]:
    yield from plane_on_backend(request, tmp_path)


def _store_wide_device(plane: RunningPlane) -> str:
    """A device with an alert open since T0 and WINDOWS predictions of SENSORS sensors after."""
    device_id = register(plane, "wide").device_id
    sequence = 0
    for start in range(0, WINDOWS, 200):
        batch = agent_pb2.RecordBatch()
        for i in range(start, start + 200):
            sequence += 1
            p = batch.records.add(sequence=sequence).prediction
            p.asset, p.score, p.model_version = "press-1", 0.001 * i, "3"
            p.window_start.seconds, p.window_end.seconds = T0 + 10 * i - 10, T0 + 10 * i
            for k in range(SENSORS):
                p.contributions[f"line-4/press-1/bearing-{k:03d}-temp"] = k / SENSORS
        if start == 0:
            sequence += 1
            alert = batch.records.add(sequence=sequence).alert
            alert.kind, alert.alert_key = agent_pb2.AlertEvent.KIND_RAISED, "press-1:anomaly:1"
            alert.asset, alert.score, alert.model_version = "press-1", 1.4, "3"
            alert.window_start.seconds = T0 - 10
            alert.window_end.seconds = alert.raised_at.seconds = T0
            alert.top_sensors.add(sensor="line-4/press-1/bearing-199-temp", contribution=0.9)
        store_batch(plane.plane.store, device_id, batch, dt.datetime.now(dt.UTC))
    return device_id


def _query(plane: RunningPlane, **fields: object) -> operator_pb2.QueryPredictionsResponse:
    credentials = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, credentials) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        request = operator_pb2.QueryPredictionsRequest(device="wide", **fields)  # type: ignore[arg-type]
        metadata = (("authorization", f"Bearer {plane.token}"),)
        return stub.QueryPredictions(request, metadata=metadata, timeout=60)


def _ends(predictions: object) -> list[int]:
    return [p.window_end.seconds for p in predictions]  # type: ignore[attr-defined]


def test_a_cut_answer_holds_the_newest_that_fit_and_says_where_the_rest_starts(
    plane: RunningPlane, tmp_path: Path
) -> None:
    _store_wide_device(plane)
    everything = [T0 + 10 * i for i in range(WINDOWS)]
    first = _query(plane, limit=100_000)
    cut = len(first.predictions)
    assert 0 < cut < WINDOWS and first.next_before_sequence > 0, (cut, first.next_before_sequence)
    assert first.ByteSize() <= PREDICTIONS_BUDGET < 4 << 20, first.ByteSize()
    assert _ends(first.predictions) == everything[-cut:]
    rest: list[int] = []
    older = first
    while older.next_before_sequence:
        older = _query(
            plane, limit=WINDOWS - cut - len(rest), before_sequence=older.next_before_sequence
        )
        rest[:0] = _ends(older.predictions)
    assert rest + _ends(first.predictions) == everything
    # A limit inside what fits is answered whole, as before.
    small = _query(plane, limit=10)
    assert _ends(small.predictions) == everything[-10:] and small.next_before_sequence == 0

    with plane.client() as client:
        whole = client.query_predictions(operator_pb2.QueryPredictionsRequest(device="wide"))
        assert _ends(whole) == everything[-1000:]  # the default limit, over two calls
        (alert,) = client.list_alerts(operator_pb2.ListAlertsRequest())
    full_size = sum(p.ByteSize() for p in whole) * WINDOWS // 1000
    assert full_size > 8 << 20, f"the windows are {full_size} bytes: not past the server's cap"

    async def console() -> list[int]:
        api = OperatorApi(plane.api_address, plane.ca_pem)
        try:
            calls = api.as_operator(plane.token)
            request = operator_pb2.QueryPredictionsRequest(device="wide", limit=3000)
            return _ends(await calls.predictions(request))
        finally:
            await api.close()

    assert asyncio.run(console()) == everything

    autoglm(
        tmp_path,
        "login",
        "--server",
        plane.api_address,
        "--ca-cert",
        str(tmp_path / "cloud" / "ca.crt"),
        "--token",
        plane.token,
    )
    shown = json.loads(autoglm(tmp_path, "alerts", "show", alert.id, "--json").stdout)
    assert len(shown["timeline"]) == WINDOWS, len(shown["timeline"])
    assert "score timeline (1200 windows" in autoglm(tmp_path, "alerts", "show", alert.id).stdout
    listed = autoglm(tmp_path, "device", "predictions", "wide", "--limit", "1100", "--json")
    assert len(json.loads(listed.stdout)) == 1100
