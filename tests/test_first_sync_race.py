"""A device's first record batch stored by two sessions at once (its old session on one
replica, its new one on another): both are stored or counted as duplicates, neither fails
on the sync row the other made."""

from __future__ import annotations

import threading

import psycopg
import pytest

from cloud.domain import PredictionRecord
from cloud.store.sql import SqlStore
from tests.support.agents import wait_for
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_the_first_batch_waits_for_the_sync_row_another_session_is_making(pg_url: str) -> None:
    """The other session has inserted the device's sync row and not committed yet. Before,
    this one found no row (FOR UPDATE on a missing row locks nothing), inserted its own,
    waited on the key, and failed with an IntegrityError once the other committed."""
    store = SqlStore(pg_url)
    device = store.create_device("p", {}, "", NOW).id
    other = psycopg.connect(pg_url)
    other.execute("INSERT INTO device_sync (device_id, last_sequence) VALUES (%s, 4)", (device,))
    outcome: list[object] = []

    def store_first_batch() -> None:
        record = PredictionRecord(device, 1, "pump", NOW, NOW, 0.1, False, "1", {})
        try:
            outcome.append(store.store_records(device, [record], [], NOW))
        except Exception as exc:  # noqa: BLE001 - what the caller got, for the assertion
            outcome.append(exc)

    worker = threading.Thread(target=store_first_batch, daemon=True)
    worker.start()
    with psycopg.connect(pg_url, autocommit=True) as watch:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        wait_for(lambda: watch.execute(waiting).fetchone() == (1,) or bool(outcome), 60)
    other.commit()
    other.close()
    worker.join(60)
    assert len(outcome) == 1, outcome
    counted = outcome[0]
    assert not isinstance(counted, BaseException), repr(counted)
    assert counted.stored == 1 and counted.last_sequence == 4, counted  # type: ignore[attr-defined]
    assert store.last_record_sequence(device) == 4
    assert [p.sequence for p in store.list_predictions(device)] == [1]
    store.close()
