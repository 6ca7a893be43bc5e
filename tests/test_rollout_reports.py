"""The rollout controller's answers to install reports: a full disk that waits, reports
resent or arriving late (after a wave's soak began, after a partial end or an abort), on the
same SQLite store, fake clock and made-up fleet as tests/test_rollout_core.py."""

from __future__ import annotations

import dataclasses

import pytest

from cloud.domain import (
    InstallOutcome,
    RolloutState,
    RolloutTarget,
)
from tests.test_rollout_core import SETTINGS, Fleet, _create, fleet

pytestmark = pytest.mark.unit

__all__ = ["fleet"]  # the fixture the tests below take


DISK_FULL = "disk full: 0 bytes free at /var/lib/agent/models/b; tried again every 30s"


def _blocked(f: Fleet, name: str, rollout_id: str) -> None:
    """What an agent reports when its disk does not take the install (it tries again)."""
    f.installed(name, rollout_id, InstallOutcome.DOWNLOAD_FAILED, detail=DISK_FULL, retrying=True)


def _target(f: Fleet, rollout_id: str, name: str) -> RolloutTarget:
    target = f.store.rollout_target(rollout_id, f.ids[name])
    assert target is not None
    return target


def test_a_device_whose_disk_does_not_take_the_install_waits_and_is_no_failure(
    fleet: Fleet,
) -> None:
    """A full disk is no verdict on the version: the agent tries again by itself. The device
    waits as deferred, saying why, the waves go on, and the failure budget (5% of 4 devices:
    none may fail) is not spent on it; once it installs, it is updated."""
    rollout_id = _create(fleet, ("1", "100%"))
    _blocked(fleet, "edge-0", rollout_id)
    target = _target(fleet, rollout_id, "edge-0")
    assert target.state.value == "deferred" and target.detail == f"download_failed: {DISK_FULL}"
    _blocked(fleet, "edge-0", rollout_id)  # reported again after a reconnect: nothing changes
    assert _target(fleet, rollout_id, "edge-0").revision == target.revision
    fleet.controller.tick()
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.RUNNING, rollout.reason
    assert rollout.current_wave == 1  # wave 0 promoted without waiting for the disk
    for name in ("edge-1", "edge-2", "edge-3"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)  # space freed on site
    fleet.controller.tick()
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.SUCCEEDED, rollout.reason
    assert set(fleet.states(rollout_id).values()) == {"updated"}, fleet.states(rollout_id)


def _one_failed_one_silent(f: Fleet, failed: str, outcome: InstallOutcome, detail: str) -> str:
    """A one-wave rollout: `failed` reports `outcome`, edge-2 and edge-3 install, and the
    other of edge-0/edge-1 sends nothing before the install timeout (ticked past)."""
    rollout_id = _create(f, ("100%",), max_failure_fraction=0.5)
    f.installed(failed, rollout_id, outcome, detail=detail)
    for name in ("edge-2", "edge-3"):
        f.installed(name, rollout_id, InstallOutcome.INSTALLED)
    f.clock.advance(SETTINGS.install_timeout.total_seconds() + 1)
    f.controller.tick()
    return rollout_id


def test_an_install_that_failed_and_later_worked_counts_as_installed(fleet: Fleet) -> None:
    rollout_id = _one_failed_one_silent(fleet, "edge-0", InstallOutcome.DOWNLOAD_FAILED, "reset")
    states = fleet.states(rollout_id)
    assert states["edge-0"] == "failed" and states["edge-1"] == "failed", states
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.PARTIAL
    # The desired state resent at their next session: both install it this time.
    for name in ("edge-0", "edge-1"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    rollout = fleet.store.get_rollout(rollout_id)
    assert set(fleet.states(rollout_id).values()) == {"updated"}, fleet.states(rollout_id)
    assert rollout.state is RolloutState.SUCCEEDED, rollout.reason  # none failed in the end


def test_a_partial_rollout_names_only_the_devices_still_failed(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), max_failure_fraction=0.5)
    for name in ("edge-0", "edge-1"):
        fleet.installed(name, rollout_id, InstallOutcome.SELF_TEST_FAILED, detail="golden")
    for name in ("edge-2", "edge-3"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert fleet.store.get_rollout(rollout_id).reason.startswith("2 of 4 device(s) failed")
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PARTIAL
    assert rollout.reason == "1 of 4 device(s) failed: edge-1 (self_test_failed: golden)"


def test_a_gate_verdict_stands_against_an_install_report_resent(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=60, max_failure_fraction=1.0)
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
        fleet.shadow(name, rollout_id, agreement=0.5 if name == "edge-1" else 1.0)
    fleet.controller.tick()
    fleet.clock.advance(61)
    fleet.controller.tick()
    assert fleet.states(rollout_id)["edge-1"] == "failed"
    fleet.installed("edge-1", rollout_id, InstallOutcome.INSTALLED)  # after a reconnect
    _blocked(fleet, "edge-1", rollout_id)
    target = _target(fleet, rollout_id, "edge-1")
    assert target.state.value == "failed" and target.detail.startswith("gate: agreement")


def test_a_device_that_installs_after_its_waves_soak_began_is_served_at_promotion(
    fleet: Fleet,
) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=600, max_failure_fraction=0.5)
    _blocked(fleet, "edge-0", rollout_id)
    fleet.installed("edge-3", rollout_id, InstallOutcome.VERIFY_FAILED, detail="torn download")
    for name in ("edge-1", "edge-2"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
        fleet.shadow(name, rollout_id)
    fleet.controller.tick()  # the soak starts without edge-0
    # Space freed: it installs in shadow, too late for this soak; it waits for promotion.
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    target = _target(fleet, rollout_id, "edge-0")
    assert target.state.value == "deferred" and "serves it at promotion" in target.detail
    fleet.clock.advance(601)
    fleet.controller.tick()
    states = fleet.states(rollout_id)
    assert states == {"edge-0": "deferred", "edge-1": "installing", "edge-2": "installing",
                      "edge-3": "failed"}, states  # fmt: skip
    promoted = fleet.desired("edge-0")
    assert promoted is not None and not promoted.shadow  # serve it, as the others do
    # edge-3 tried again at its next session and installed in shadow after the promotion:
    # it is sent the version to serve, not left running it in shadow for good.
    fleet.installed("edge-3", rollout_id, InstallOutcome.INSTALLED)
    assert fleet.states(rollout_id)["edge-3"] == "installing"
    late = fleet.desired("edge-3")
    assert late is not None and not late.shadow and late.rollout_id == rollout_id
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert set(fleet.states(rollout_id).values()) == {"updated"}, fleet.states(rollout_id)
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.SUCCEEDED


def test_a_report_after_an_abort_is_recorded_and_revives_nothing(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    _blocked(fleet, "edge-0", rollout_id)
    fleet.controller.abort(rollout_id, "wrong model")
    assert fleet.states(rollout_id)["edge-0"] == "rolled_back"
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)  # freed just then
    target = _target(fleet, rollout_id, "edge-0")
    assert target.state.value == "rolled_back", target
    assert target.detail == "reported after the abort: installed (onnxruntime)"
    fleet.installed("edge-0", rollout_id, InstallOutcome.SELF_TEST_FAILED, detail="golden")
    assert fleet.states(rollout_id)["edge-0"] == "rolled_back"
    assert fleet.controller.tick() == []
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.ABORTED
    desired = fleet.desired("edge-0")
    assert desired is not None and desired.revert_version == "2"  # still sent back


def _partial_with_edge0_timed_out(f: Fleet) -> str:
    """One wave with a soak: edge-0 never reports its shadow install, times out (failed, its
    desired state still shadow), the others are judged, promoted and serve it: partial."""
    rollout_id = _create(f, ("100%",), soak_s=60, max_failure_fraction=0.5)
    for name in ("edge-1", "edge-2", "edge-3"):
        f.installed(name, rollout_id, InstallOutcome.INSTALLED)
        f.shadow(name, rollout_id)
    f.clock.advance(SETTINGS.install_timeout.total_seconds() + 1)
    f.controller.tick()
    f.clock.advance(61)
    f.controller.tick()
    for name in ("edge-1", "edge-2", "edge-3"):
        f.installed(name, rollout_id, InstallOutcome.INSTALLED)
    f.controller.tick()
    rollout = f.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PARTIAL, (rollout.state, rollout.reason)
    assert f.states(rollout_id)["edge-0"] == "failed", f.states(rollout_id)
    late = f.desired("edge-0")
    assert late is not None and late.shadow
    return rollout_id


def test_a_shadow_install_after_a_partial_rollout_ended_is_sent_the_version_to_serve(
    fleet: Fleet,
) -> None:
    """The rollout promoted the version: a device that installs it in shadow afterwards is
    sent it to serve, never left in shadow for good, and the rollout counts as succeeded only
    once the device serves it."""
    rollout_id = _partial_with_edge0_timed_out(fleet)
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)  # back, in shadow
    rollout = fleet.store.get_rollout(rollout_id)
    assert fleet.states(rollout_id)["edge-0"] == "installing", fleet.states(rollout_id)
    served = fleet.desired("edge-0")
    assert served is not None and not served.shadow and served.rollout_id == rollout_id
    assert rollout.state is RolloutState.PARTIAL, (rollout.state, rollout.reason)
    assert rollout.reason == (
        "1 of 4 device(s) sent the version to serve, not serving it yet: edge-0"
    ), rollout.reason
    # It installs what it was sent: now it serves the version.
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    rollout = fleet.store.get_rollout(rollout_id)
    assert set(fleet.states(rollout_id).values()) == {"updated"}, fleet.states(rollout_id)
    assert (rollout.state, rollout.reason) == (RolloutState.SUCCEEDED, "")


def test_a_gate_verdict_stored_before_the_gate_prefix_stands_against_a_resent_install(
    fleet: Fleet,
) -> None:
    """A control plane before the 'gate: ' prefix stored the too-few-windows verdict as
    'only N shadow window(s) reported': still a verdict after an upgrade."""
    rollout_id = _partial_with_edge0_timed_out(fleet)
    old = dataclasses.replace(
        _target(fleet, rollout_id, "edge-0"), detail="only 0 shadow window(s) reported"
    )
    fleet.store.save_target(old)
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)  # resent after upgrade
    _blocked(fleet, "edge-0", rollout_id)
    target = _target(fleet, rollout_id, "edge-0")
    assert (target.state.value, target.detail) == ("failed", old.detail), target
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.PARTIAL


def test_a_failed_device_that_turns_out_disk_full_leaves_the_partial_reason(
    fleet: Fleet,
) -> None:
    rollout_id = _one_failed_one_silent(fleet, "edge-1", InstallOutcome.SELF_TEST_FAILED, "golden")
    assert "edge-0" in fleet.store.get_rollout(rollout_id).reason
    _blocked(fleet, "edge-0", rollout_id)  # its next session: the disk is full
    assert fleet.states(rollout_id)["edge-0"] == "deferred"
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PARTIAL
    assert rollout.reason == "1 of 4 device(s) failed: edge-1 (self_test_failed: golden)"


def test_a_partial_rollouts_only_failure_turning_out_disk_full_is_sent_the_served_version(
    fleet: Fleet,
) -> None:
    """No failure is left: like a device deferred at promotion, it is sent the version to
    serve (not the shadow one its wave had) and installs it once its disk takes it."""
    rollout_id = _partial_with_edge0_timed_out(fleet)
    _blocked(fleet, "edge-0", rollout_id)
    assert fleet.states(rollout_id)["edge-0"] == "deferred"
    served = fleet.desired("edge-0")
    assert served is not None and not served.shadow and served.rollout_id == rollout_id
    rollout = fleet.store.get_rollout(rollout_id)
    assert (rollout.state, rollout.reason) == (RolloutState.SUCCEEDED, "")
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    assert fleet.states(rollout_id)["edge-0"] == "updated"
