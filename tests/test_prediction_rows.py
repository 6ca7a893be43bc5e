"""Synced predictions stored from rows built straight from the wire (`cloud.service.record_rows`)
are stored exactly as the general path (domain records) stores them, on SQLite and
PostgreSQL; records the quick check does not take are refused with the general wording; and
the agent's batch bytes are the message the protobuf library would build."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cloud.service.records import _record, split_batch, store_batch
from cloud.store import Store, open_store
from edge_agent.sync import encode_batch
from protos.autoglm.v1 import agent_pb2

NOW = dt.datetime(2026, 11, 1, 1, 2, 3, 456789, tzinfo=dt.UTC)
COLUMNS = (
    "asset, window_start, window_end, score, anomalous, model_version, contributions, received_at"
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""
    s = open_store(url or f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def _batch(count: int) -> agent_pb2.RecordBatch:
    rng = random.Random(7)
    batch = agent_pb2.RecordBatch()
    for i in range(1, count + 1):
        r = batch.records.add()
        r.sequence = i
        p = r.prediction
        p.asset, p.score, p.anomalous, p.model_version = f"pump-{i}", rng.random(), i % 3 == 0, "v"
        p.window_start.seconds = rng.randint(-62_135_596_800, 253_402_300_799)
        p.window_start.nanos = rng.randint(0, 999_999_999)
        p.window_end.seconds, p.window_end.nanos = 1_790_000_000 + i, 1_234_567
        for k in range(i % 6):
            p.contributions[f's"%{k}\u00e9'] = rng.random() * 10
    return batch


def test_rows_store_what_domain_records_store(store: Store) -> None:
    fast, general = (store.create_device(n, {}, "", NOW).id for n in ("fast", "general"))
    batch = _batch(120)
    split = split_batch(fast, batch)
    assert not split.predictions and len(split.prediction_rows) == 120 and split.up_to == 120
    domain = [_record(general, r, "x") for r in batch.records]
    assert (
        store.store_records(fast, [], [], NOW, prediction_rows=split.prediction_rows).stored == 120
    )
    assert store.store_records(general, domain, [], NOW).stored == 120  # type: ignore[arg-type]
    again = store.store_records(fast, [], [], NOW, prediction_rows=split.prediction_rows[:50])
    assert (again.stored, again.duplicates, again.last_sequence) == (0, 50, 120)
    a, b = store.list_predictions(fast), store.list_predictions(general)
    assert [x.__dict__ | {"device_id": ""} for x in a] == [
        y.__dict__ | {"device_id": ""} for y in b
    ]
    query = text(f"SELECT {COLUMNS} FROM predictions WHERE device_id = :d ORDER BY sequence")
    with store._sessions() as s:
        stored = [s.execute(query, {"d": d}).all() for d in (fast, general)]
    assert stored[0] == stored[1]
    since = dt.datetime.fromtimestamp(1_790_000_100, dt.UTC)
    assert len(store.list_predictions(fast, since=since)) == 21


def test_records_out_of_bounds_are_refused_in_the_general_words(store: Store) -> None:
    device = store.create_device("d", {}, "", NOW).id
    batch = agent_pb2.RecordBatch()
    for seq, field, value in [
        (5, "score", math.nan),
        (6, "asset", "x" * 65),
        (7, "model_version", "a\x00"),
        (8, "asset", "fine"),
    ]:
        r = batch.records.add()
        r.sequence = seq
        setattr(r.prediction, field, value)
    fine = batch.records[3].prediction  # its window within RecordTimes' range
    fine.window_start.seconds, fine.window_end.seconds = (
        int(NOW.timestamp()) - 10,
        int(NOW.timestamp()),
    )
    r = batch.records.add()
    r.sequence, r.prediction.window_end.seconds = 9, 253_402_300_800
    r = batch.records.add()
    r.sequence = 10
    r.prediction.contributions["s"] = math.inf
    r = batch.records.add()
    r.sequence = 8  # repeated
    ack, _ = store_batch(store, device, batch, NOW)
    assert (ack.up_to_sequence, ack.stored) == (10, 1)
    reasons = {r.sequence: r.reason for r in ack.rejected}
    assert reasons[5].endswith("prediction.score: nan is not a finite number")
    assert reasons[6].endswith("prediction.asset: 65 characters > 64")
    assert reasons[7].endswith("prediction.model_version: contains a NUL character")
    assert "outside 0001-01-01..9999-12-31" in reasons[9]
    assert reasons[10].endswith("prediction.contributions['s']: inf is not a finite number")
    assert reasons[8].endswith("the sequence number repeats in the batch")


def test_batch_bytes_are_the_protobuf_message() -> None:
    bodies = [r for r in _batch(30).records]
    rows = []
    for seq, record in zip([1, 127, 128, 300, 2**40, 2**63 - 1] * 5, bodies, strict=True):
        record.ClearField("sequence")
        rows.append((seq, 1, record.SerializeToString()))
    expected = agent_pb2.RecordBatch()
    for seq, _kind, body in rows:
        r = expected.records.add()
        r.ParseFromString(body)
        r.sequence = seq
    assert agent_pb2.AgentMessage.FromString(encode_batch(rows)) == agent_pb2.AgentMessage(
        records=expected
    )
