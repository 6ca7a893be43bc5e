"""Shadow reports across an agent restart: the agent compares the candidate with its
incumbent on the newest unbroken run of rows it holds, so after a restart (or a gap in its
data) it reports from 0 windows again. Such a report must not replace the measure the soak
collected and fail the device's gate for too few windows; a report with enough windows
does replace it. Same SQLite store, fake clock and fleet as tests/test_rollout_core.py."""

from __future__ import annotations

import pytest

from cloud.domain import InstallOutcome, RolloutState
from tests.test_rollout_core import SETTINGS, Fleet, _create, fleet

pytestmark = pytest.mark.unit

__all__ = ["fleet"]  # the fixture the tests below take


def _soaked(f: Fleet) -> str:
    """A one-wave rollout with a 60 s soak (min_shadow_windows 20), every device installed
    in shadow and reporting 40 windows that pass the gates."""
    rollout_id = _create(f, ("100%",), soak_s=60, max_failure_fraction=0.5)
    for name in f.ids:
        f.installed(name, rollout_id, InstallOutcome.INSTALLED)
        f.shadow(name, rollout_id, windows=40)
    f.controller.tick()  # every install reported: the soak starts now
    return rollout_id


def _judged(f: Fleet, rollout_id: str) -> dict[str, str]:
    """The targets' states once the soak and the grace for shadow windows are over."""
    f.clock.advance(61 + SETTINGS.shadow_grace.total_seconds())
    f.controller.tick()
    return f.states(rollout_id)


def test_a_restarted_agents_short_reports_do_not_fail_its_measured_soak(fleet: Fleet) -> None:
    rollout_id = _soaked(fleet)
    fleet.shadow("edge-0", rollout_id, windows=0)  # restarted: no rows compared yet
    fleet.shadow("edge-0", rollout_id, windows=5, agreement=0.5)  # counting again
    target = fleet.store.rollout_target(rollout_id, fleet.ids["edge-0"])
    assert target is not None and target.shadow_windows == 40, target.shadow
    states = _judged(fleet, rollout_id)
    assert states["edge-0"] == "installing", states  # promoted with the others
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.RUNNING, rollout.reason


def test_a_report_with_enough_windows_replaces_a_larger_one(fleet: Fleet) -> None:
    """After the restart the agent measured enough windows again: its newer measure is
    judged (here: it disagrees with the incumbent), not the one from before."""
    rollout_id = _soaked(fleet)
    fleet.shadow("edge-1", rollout_id, windows=25, agreement=0.5)
    states = _judged(fleet, rollout_id)
    assert states["edge-1"] == "failed", states
    target = fleet.store.rollout_target(rollout_id, fleet.ids["edge-1"])
    assert target is not None and "agreement 0.500" in target.detail, target.detail


def test_a_device_that_never_measured_enough_still_fails_for_too_few_windows(
    fleet: Fleet,
) -> None:
    """A report below the gate's need replaces only one of fewer windows: a device that
    never measured enough fails, on the most it measured."""
    rollout_id = _create(fleet, ("100%",), soak_s=60, max_failure_fraction=0.5)
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
        fleet.shadow(name, rollout_id, windows=40 if name != "edge-2" else 12)
    fleet.shadow("edge-2", rollout_id, windows=3)  # restarted
    fleet.controller.tick()
    states = _judged(fleet, rollout_id)
    assert states["edge-2"] == "failed", states
    target = fleet.store.rollout_target(rollout_id, fleet.ids["edge-2"])
    assert target is not None and "only 12 shadow window(s)" in target.detail, target.detail
