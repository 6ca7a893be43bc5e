"""SparseLog: a count left pending is said by the next sweep (a line logged once the period
has passed), not only when the table fills; a rollout's report lines are keyed by rollout
too, so one rollout's failures do not hold back another's on the same device."""

from __future__ import annotations

import logging

import pytest

from cloud.domain import InstallOutcome
from cloud.sparse_log import SparseLog
from tests.test_report_flood import FakeClock, _lines, sparse_clock
from tests.test_rollout_core import Fleet, _create, fleet

__all__ = ["fleet", "sparse_clock"]  # the fixtures the tests below take


@pytest.mark.unit
def test_a_pending_count_is_said_at_the_next_sweep_without_the_table_filling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    logger = logging.getLogger("tests.sparse_sweep")
    sparse = SparseLog(logger, every_s=60.0, clock=clock)  # 10,000 keys: never full here
    caplog.set_level(logging.INFO, logger="tests.sparse_sweep")
    for _ in range(5):
        sparse.warning("a", "why", "device %s did it", "a")
    clock.now += 60.0
    sparse.warning("b", "other", "device %s did something else", "b")
    said = [r.getMessage() for r in caplog.records]
    assert "device a: 4 more 'why' line(s) not logged" in said, said
    assert ("a", "why") not in sparse._keys and ("b", "other") in sparse._keys


@pytest.mark.unit
def test_failures_of_two_rollouts_on_one_device_are_each_logged(
    fleet: Fleet, sparse_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud.rollout_reports")
    first = _create(fleet, ("100%",))
    fleet.installed("edge-0", first, InstallOutcome.VERIFY_FAILED, detail="bad")
    fleet.controller.abort(first, "test")
    second = _create(fleet, ("100%",))
    fleet.installed("edge-0", second, InstallOutcome.VERIFY_FAILED, detail="bad")
    failed = _lines(caplog, "failed: verify_failed")
    assert len(failed) == 2 and second in failed[1], failed
