"""A batch whose store fails after its captures were charged (a lock timeout, a failover, the
device removed meanwhile) is not charged: the charge is made in the transaction that stores
the captures and rolls back with it. The agent resends the batch; it is charged once, and no
capture within the budget is refused (the agent would quarantine it for good). On SQLite and
PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud import capture_budget
from cloud.capture_budget import CaptureBudget
from cloud.captures import CaptureFilter
from cloud.service.records import store_batch
from cloud.store import Store, open_store, sql_records
from edge_agent.errors import Unavailable
from protos.autoglm.v1 import agent_pb2
from tests.support.captures import T0, capture_proto
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""
    s = open_store(url or f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def test_a_batch_that_fails_to_store_is_not_charged_and_its_resend_is_charged_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_budget, "DAY_BUDGET", CaptureBudget(captures=3, bytes=1 << 30))
    device = store.create_device("edge", {}, "", NOW).id
    batch = agent_pb2.RecordBatch(records=[capture_proto(s) for s in (1, 2)])
    folded = sql_records.apply_alert_events  # runs after the charge, in the same transaction
    failures = [Unavailable("the database did not answer in time (lock timeout)")]

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return folded(*args, **kwargs)

    monkeypatch.setattr(sql_records, "apply_alert_events", fail_once)
    with pytest.raises(Unavailable):
        store_batch(store, device, batch, NOW)
    assert not failures, "the store did not fail where the test meant it to"
    ack, _ = store_batch(store, device, batch, NOW)  # the agent resends the batch
    assert (ack.stored, list(ack.rejected)) == (2, []), ack
    # The day holds two captures: a third fits, a fourth does not.
    more = agent_pb2.RecordBatch(records=[capture_proto(s) for s in (3, 4)])
    ack, _ = store_batch(store, device, more, NOW)
    assert ack.stored == 1 and [r.sequence for r in ack.rejected] == [4], ack
    assert "over this device's capture budget" in ack.rejected[0].reason, ack
    again, _ = store_batch(store, device, batch, NOW)  # resent once more: stored, not charged
    assert (again.stored, again.duplicates, list(again.rejected)) == (0, 2, []), again
    since = dt.datetime.fromtimestamp(T0, dt.UTC)
    assert [c.sequence for c in store.list_captures(CaptureFilter(since))] == [1, 2, 3]
