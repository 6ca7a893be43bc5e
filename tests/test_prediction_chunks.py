"""What one QueryPredictions page costs: the server reads the newest predictions in chunks
sized by its byte budget, not the whole limit (up to 100,000) at each page; the pages hold the
same predictions as before; a client's paging stops at the server's cap."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.client import older_predictions
from cloud.domain import PredictionRecord
from cloud.service import operator_alerts
from cloud.service.records import store_batch
from cloud.store import open_store
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.conftest import register
from tests.support.cloud import RunningPlane
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration]
T0 = 1_790_000_000


def _batch(first: int, count: int, sensors: Callable[[int], int]) -> agent_pb2.RecordBatch:
    batch = agent_pb2.RecordBatch()
    for sequence in range(first, first + count):
        p = batch.records.add(sequence=sequence).prediction
        p.asset, p.score, p.model_version = "press-1", 0.001 * sequence, "3"
        p.window_start.seconds, p.window_end.seconds = T0 + 10 * sequence - 10, T0 + 10 * sequence
        for k in range(sensors(sequence)):
            p.contributions[f"bearing-{k:03d}-temp"] = k / 100
    return batch


def _whole_limit_then_cut(
    rows: list[PredictionRecord], budget: int
) -> operator_pb2.QueryPredictionsResponse:
    """The answer as 1fe08a7 made it: all `limit` rows read, the newest that fit kept."""
    kept: list[agent_pb2.Prediction] = []
    size = 0
    for index in range(len(rows) - 1, -1, -1):
        message = operator_alerts.prediction_to_proto(rows[index])
        size += message.ByteSize() + 6
        if size > budget and kept:
            kept.reverse()
            return operator_pb2.QueryPredictionsResponse(
                predictions=kept, next_before_sequence=rows[index + 1].sequence
            )
        kept.append(message)
    kept.reverse()
    return operator_pb2.QueryPredictionsResponse(predictions=kept)


def test_chunked_pages_hold_what_the_whole_limit_cut_to_the_budget_held(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'autoglm.db'}")
    device = store.create_device("p", {}, "", NOW)
    store_batch(store, device.id, _batch(1, 700, lambda s: (s * 7) % 40), NOW)
    read: list[int] = []

    def older(count: int, below: int) -> list[PredictionRecord]:
        rows = store.list_predictions(device.id, "", None, count, None, below)
        read.append(len(rows))
        return rows

    for budget in (1, 600, 5_000, 40_000, 1 << 30):
        for limit in (1, 7, 150, 699, 700, 100_000):
            for before in (0, 2, 333):
                read.clear()
                got = operator_alerts._fitting(older, limit, before, budget)
                whole = store.list_predictions(device.id, "", None, limit, None, before)
                assert got == _whole_limit_then_cut(whole, budget), (budget, limit, before)
                # One chunk past what the page holds at most, not the whole limit.
                most = len(got.predictions) + operator_alerts.MAX_PREDICTIONS_CHUNK
                assert sum(read) <= min(len(whole), most) + operator_alerts.PREDICTIONS_CHUNK
    store.close()


def test_paging_through_a_device_reads_each_prediction_about_once(
    plane: RunningPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 windows at a small budget, dozens of pages: every page used to read all that
    was left (up to the limit), quadratic in the pages; now each row about once."""
    device_id = register(plane, "wide").device_id
    store = plane.plane.store
    for first in range(1, 2001, 500):
        store_batch(store, device_id, _batch(first, 500, lambda s: 10), dt.datetime.now(dt.UTC))
    monkeypatch.setattr(operator_alerts, "PREDICTIONS_BUDGET", 20_000)
    read: list[int] = []
    listing = store.list_predictions

    def counted(*args: object, **kwargs: object) -> list[PredictionRecord]:
        rows = listing(*args, **kwargs)  # type: ignore[arg-type]
        read.append(len(rows))
        return rows

    monkeypatch.setattr(store, "list_predictions", counted)
    with plane.client() as client:
        request = operator_pb2.QueryPredictionsRequest(device="wide", limit=100_000)
        got = client.query_predictions(request)
    assert [p.window_end.seconds for p in got] == [T0 + 10 * s for s in range(1, 2001)]
    # Each page reads its own rows and at most a first chunk's more.
    assert len(read) > 20 and sum(read) <= 2000 + len(read) * operator_alerts.PREDICTIONS_CHUNK, (
        len(read),
        sum(read),
    )


def test_a_client_stops_paging_at_the_servers_cap() -> None:
    """A limit above the server's 100,000 is answered as 100,000 over all parts: the client
    used to go on asking until its own limit."""
    request = operator_pb2.QueryPredictionsRequest(device="wide", limit=150_000)
    cut = operator_pb2.QueryPredictionsResponse(next_before_sequence=50_001)
    assert older_predictions(request, cut, 100_000) is None
    following = older_predictions(request, cut, 99_000)
    assert following is not None and following.limit == 1_000
    assert following.before_sequence == 50_001
