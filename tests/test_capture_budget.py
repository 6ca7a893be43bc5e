"""Each device's captures are charged to a daily budget at the control plane, on SQLite and
PostgreSQL: past it, each capture is refused alone with the reason, what is already stored
(resent after a reconnect) is not charged again, the next UTC day starts afresh, and the
budget outlives the process. The default sits far above what a correctly configured agent
sends, counted as the agent counts it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cloud.capture_budget import DAY_BUDGET, CaptureBudget, capture_bytes
from cloud.captures import CaptureRecord
from cloud.service.records import capture_from_proto
from cloud.store import Store, open_store
from edge_agent.config import CapturePolicy, OutboxPolicy
from edge_agent.errors import NotFound
from tests.support.captures import capture_proto, window
from tests.support.stores import NOW, PostgresBackend, SqliteBackend

pytestmark = [pytest.mark.integration]
WORDS = "over this device's capture budget at the control plane for 2026-11-01 UTC"


def _capture(device_id: str, sequence: int, t: int = 24, n: int = 4) -> CaptureRecord:
    record = capture_proto(sequence, window(t=t, n=n, seed=sequence))
    return capture_from_proto(device_id, sequence, record.capture, "test")


class CaptureBudgetContract:
    def test_captures_past_the_count_are_refused_each_with_the_reason(self, store: Store) -> None:
        device = store.create_device("edge", {}, "", NOW).id
        budget = CaptureBudget(captures=3, bytes=1 << 30)
        first = [_capture(device, s) for s in (1, 2, 3, 4, 5)]
        refused = store.charge_captures(device, first, NOW, budget)
        assert sorted(refused) == [4, 5], refused
        assert all(WORDS in reason for reason in refused.values()), refused
        assert "3 captures of" in refused[4], refused[4]
        store.store_records(device, [], [], NOW, captures=first[:3])
        # Resent after a reconnect: what is stored is not charged again (nor refused); a
        # new one still is, later the same day, whatever the batch.
        again = [*first[:3], _capture(device, 6)]
        later = NOW + dt.timedelta(hours=11)
        assert store.charge_captures(device, again, later, budget).keys() == {6}
        # The next UTC day starts afresh.
        tomorrow = NOW + dt.timedelta(hours=12)
        fresh = [_capture(device, s) for s in (7, 8, 9, 10)]
        assert store.charge_captures(device, fresh, tomorrow, budget).keys() == {10}

    def test_captures_past_the_bytes_are_refused_and_smaller_ones_still_fit(
        self, store: Store
    ) -> None:
        device = store.create_device("edge", {}, "", NOW).id
        small, large = _capture(device, 1), _capture(device, 2, t=200, n=16)
        after = _capture(device, 3)
        budget = CaptureBudget(captures=100, bytes=3 * capture_bytes(small))
        assert capture_bytes(large) > 2 * capture_bytes(small)
        refused = store.charge_captures(device, [small, large, after], NOW, budget)
        assert list(refused) == [2], refused
        assert f"{capture_bytes(large):,} bytes" in refused[2], refused[2]
        assert store.charge_captures(device, [_capture(device, 4)], NOW, budget) == {}
        assert list(store.charge_captures(device, [_capture(device, 5)], NOW, budget)) == [5]

    def test_a_device_that_is_not_there_is_not_found(self, store: Store) -> None:
        with pytest.raises(NotFound, match="nope"):
            store.charge_captures("nope", [_capture("nope", 1)], NOW)
        assert store.charge_captures("nope", [], NOW) == {}  # nothing to charge: no query


class TestSqliteCaptureBudget(SqliteBackend, CaptureBudgetContract):
    def test_the_day_so_far_outlives_the_process(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'kept.db'}"
        store = open_store(url)
        device = store.create_device("edge", {}, "", NOW).id
        budget = CaptureBudget(captures=2, bytes=1 << 30)
        assert store.charge_captures(device, [_capture(device, 1)], NOW, budget) == {}
        store.close()
        store = open_store(url)  # a restart, or another replica
        try:
            refused = store.charge_captures(
                device, [_capture(device, s) for s in (2, 3)], NOW, budget
            )
            assert list(refused) == [3], refused
        finally:
            store.close()


@pytest.mark.postgres
class TestPostgresCaptureBudget(PostgresBackend, CaptureBudgetContract):
    pass


def test_the_default_budget_is_far_above_a_correctly_configured_agent() -> None:
    """The plane counts a capture about as the agent does (its encoded record), and its day
    takes a whole default outbox of captures synced at once besides the agent's own day."""
    for t, n in ((24, 4), (120, 8), (1, 256), (256, 256)):
        c = _capture("d", 1, t=t, n=n)
        wire = capture_proto(1, window(t=t, n=n, seed=1)).ByteSize()
        assert 0.9 * wire <= capture_bytes(c) <= 1.1 * wire, (t, n, wire, capture_bytes(c))
    agent_day, outbox = CapturePolicy().max_bytes_per_day, OutboxPolicy().max_bytes
    assert DAY_BUDGET.bytes >= outbox + agent_day, (DAY_BUDGET, outbox, agent_day)
    assert DAY_BUDGET.bytes >= 16 * agent_day
    policy = CapturePolicy()
    assert DAY_BUDGET.captures >= 10_000 * policy.windows_per_alert + policy.samples_per_day
