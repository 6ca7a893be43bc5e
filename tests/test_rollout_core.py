"""The rollout state machine, phase by phase and gate by gate, in milliseconds: the real
controller on a SQLite store, a fake clock, devices and reports made up in the test (no
agents, no network). The end-to-end tests (tests/test_rollouts.py) run the same controller
with real agents."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.domain import (
    DesiredModel,
    DeviceRecord,
    DeviceSummary,
    Gates,
    InstallOutcome,
    InstallReport,
    ModelRecord,
    PresenceUpdate,
    RolloutState,
    ShadowReport,
)
from cloud.rollout_rules import LATENCY_FLOOR_MS, RolloutSettings, parse_waves, waiting_for
from cloud.rollouts import RolloutController
from cloud.store import Store, open_store
from edge_agent.errors import FailedPrecondition, InvalidInput

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
SETTINGS = RolloutSettings(
    offline_after=dt.timedelta(seconds=30),
    install_timeout=dt.timedelta(minutes=15),
    shadow_grace=dt.timedelta(minutes=10),
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclasses.dataclass
class Fleet:
    store: Store
    clock: Clock
    controller: RolloutController
    ids: dict[str, str]  # name -> device id

    def online(self, *names: str) -> None:
        self.store.record_presence(
            [
                PresenceUpdate(
                    self.ids[n], self.clock(), True, status={"model_name": "pump",
                                                              "model_version": "1"}
                )
                for n in names
            ]
        )  # fmt: skip

    def installed(self, name: str, rollout_id: str, outcome: InstallOutcome, version: str = "2",
                  detail: str = "", retrying: bool = False) -> None:  # fmt: skip
        report = InstallReport(rollout_id, version, outcome, detail, "onnxruntime", "pump", "1",
                               retrying)  # fmt: skip
        self.controller.on_install(self.ids[name], report)

    def shadow(self, name: str, rollout_id: str, windows: int = 40, agreement: float = 1.0,
               latency: tuple[float, float] = (3.0, 2.0), rates: tuple[float, float] = (0, 0),
               floor: tuple[float, float] = (0.0, 0.0), p50: tuple[float, float] = (0, 0),
               samples: int = 0) -> None:  # fmt: skip
        report = ShadowReport(rollout_id, "2", windows, agreement, *rates, *latency, "", *floor,
                              *p50, samples)  # fmt: skip
        self.controller.on_shadow(self.ids[name], report)

    def states(self, rollout_id: str) -> dict[str, str]:
        by_id = {v: k for k, v in self.ids.items()}
        return {by_id[t.device_id]: t.state.value for t in self.store.rollout_targets(rollout_id)}

    def desired(self, name: str) -> DesiredModel | None:
        return self.store.get_desired(self.ids[name])


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    store = open_store(f"sqlite:///{tmp_path / 'cloud.db'}")
    clock = Clock()
    ids = {}
    for i in range(4):
        device = store.create_device(f"edge-{i}", {"site": "a"}, "", T0)
        store.add_enrollment_token(device.id, f"h{i}", T0, T0 + dt.timedelta(hours=1))
        store.enroll(f"h{i}", T0, lambda d: d.id, lambda c: ("serial", f"fp-{c}", T0))
        ids[device.name] = device.id
    for version in ("1", "2"):
        store.add_model(
            ModelRecord("pump", version, f"sha256:{version * 64}", f"sha256:{'f' * 64}", 10, T0, {})
        )
    f = Fleet(store, clock, RolloutController(store, SETTINGS, clock), ids)
    f.online(*ids)
    yield f
    store.close()


def _create(f: Fleet, waves: tuple[str, ...], soak_s: float = 0.0, **gates: float) -> str:
    rollout, _ = f.controller.create(
        "pump",
        "2",
        "site=a",
        waves,
        soak_s,
        Gates(**gates),  # type: ignore[arg-type]
    )
    return rollout.id


def test_a_wave_sends_online_devices_the_version_and_defers_offline_ones(fleet: Fleet) -> None:
    fleet.clock.advance(60)  # everyone's presence is now older than offline_after...
    fleet.online("edge-0", "edge-1", "edge-2")  # ...but these three report again
    rollout_id = _create(fleet, ("100%",))
    assert fleet.states(rollout_id) == {
        "edge-0": "installing",
        "edge-1": "installing",
        "edge-2": "installing",
        "edge-3": "deferred",
    }
    desired = fleet.desired("edge-0")
    assert desired is not None and desired.model_version == "2" and not desired.shadow
    assert fleet.desired("edge-3") is None  # gets it when it comes back (at promotion)


def test_waves_promote_one_after_another_and_the_rollout_succeeds(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    assert fleet.states(rollout_id)["edge-0"] == "installing"
    assert set(list(fleet.states(rollout_id).values())[1:]) == {"waiting"}
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert {fleet.states(rollout_id)[n] for n in ("edge-1", "edge-2", "edge-3")} == {"installing"}
    for name in ("edge-1", "edge-2", "edge-3"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.SUCCEEDED, rollout
    assert set(fleet.states(rollout_id).values()) == {"updated"}


def test_no_install_report_in_time_is_a_failure_and_past_the_limit_the_rollout_aborts(
    fleet: Fleet,
) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    fleet.clock.advance(SETTINGS.install_timeout.total_seconds() - 1)
    fleet.controller.tick()
    assert fleet.states(rollout_id)["edge-0"] == "installing"
    fleet.clock.advance(2)
    fleet.controller.tick()
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.ABORTED
    assert "no install report in time" in rollout.reason
    desired = fleet.desired("edge-0")
    assert desired is not None and desired.revert_version == "2"  # sent back


def test_failures_within_the_limit_end_partial_never_succeeded(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), max_failure_fraction=0.5)
    fleet.installed("edge-0", rollout_id, InstallOutcome.SELF_TEST_FAILED, detail="golden")
    for name in ("edge-1", "edge-2", "edge-3"):
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    rollout = fleet.store.get_rollout(rollout_id)
    assert rollout.state is RolloutState.PARTIAL
    assert "1 of 4 device(s) failed" in rollout.reason and "self_test_failed" in rollout.reason


def test_the_soak_waits_then_the_shadow_gates_judge_each_device(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=600, max_failure_fraction=0.5)
    desired = fleet.desired("edge-0")
    assert desired is not None and desired.shadow  # a soak runs the candidate in shadow
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert set(fleet.states(rollout_id).values()) == {"shadowing"}
    fleet.shadow("edge-0", rollout_id)
    fleet.shadow("edge-1", rollout_id, agreement=0.5)  # behaves differently
    fleet.shadow("edge-2", rollout_id, latency=(40.0, 10.0))  # 4x slower, 30 ms more
    fleet.shadow("edge-3", rollout_id, latency=(4.0, 1.0))  # 4x, but within the 5 ms floor
    fleet.clock.advance(599)
    fleet.controller.tick()
    assert set(fleet.states(rollout_id).values()) == {"shadowing"}  # still soaking
    fleet.clock.advance(2)
    fleet.controller.tick()
    states = fleet.states(rollout_id)
    assert states["edge-1"] == "failed" and states["edge-2"] == "failed", states
    targets = {t.device_id: t for t in fleet.store.rollout_targets(rollout_id)}
    assert "agreement 0.500" in targets[fleet.ids["edge-1"]].detail
    assert "latency p99 40.0 ms" in targets[fleet.ids["edge-2"]].detail
    assert states["edge-0"] == "installing" and states["edge-3"] == "installing"  # promoted
    promoted = fleet.desired("edge-3")
    assert promoted is not None and not promoted.shadow
    assert LATENCY_FLOOR_MS > 4.0 - 1.0


def test_a_tick_reads_only_the_devices_it_decides_on(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-fleet device reads cost most of a CPU-second at 10,000 devices: a wave's start
    reads its own devices, the shadow gates the shadowing ones, a soaking tick none."""
    reads: list[tuple[str, frozenset[str] | None]] = []
    summaries, listed = fleet.store.device_summaries, fleet.store.list_devices

    def spy_summaries(ids: Collection[str] | None = None) -> list[DeviceSummary]:
        reads.append(("summaries", None if ids is None else frozenset(ids)))
        return summaries(ids)

    def spy_list(selector: Mapping[str, str]) -> list[DeviceRecord]:
        reads.append(("list", None))
        return listed(selector)

    monkeypatch.setattr(fleet.store, "device_summaries", spy_summaries)
    monkeypatch.setattr(fleet.store, "list_devices", spy_list)
    rollout_id = _create(fleet, ("25%", "100%"), soak_s=600)
    first = [t.device_id for t in fleet.store.rollout_targets(rollout_id) if t.wave == 0]
    assert reads == [("list", None), ("summaries", frozenset(first))]  # targets, then wave 0
    by_id = {v: k for k, v in fleet.ids.items()}
    fleet.installed(by_id[first[0]], rollout_id, InstallOutcome.INSTALLED)
    fleet.shadow(by_id[first[0]], rollout_id)
    reads.clear()
    for _ in range(3):
        fleet.clock.advance(100)
        fleet.controller.tick()
    assert reads == []  # soaking: nothing to decide about any device
    fleet.clock.advance(400)
    fleet.controller.tick()
    assert reads[0] == ("summaries", frozenset(first)), reads  # the gates: the shadowing one
    assert ("list", None) not in reads and ("summaries", None) not in reads, reads


def test_the_behaviour_gate_judges_against_the_incumbents_own_noise_floor(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=60, max_failure_fraction=1.0)
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    # Two sound models on a noisy site (issue 23's 0.869 < 0.9): the incumbent agrees with
    # itself recalibrated only 0.86, so 0.869 passes.
    fleet.shadow("edge-0", rollout_id, agreement=0.869, floor=(0.86, 0.0))
    # The same agreement where the incumbent is steady (0.98): the configured 0.9 holds.
    fleet.shadow("edge-1", rollout_id, agreement=0.869, floor=(0.98, 0.0))
    # A floor far down (0.3, as a device says) lowers the gate by at most 0.1: 0.75 fails.
    fleet.shadow("edge-2", rollout_id, agreement=0.75, floor=(0.3, 0.0))
    # The alert rate moves by 0.15 where the incumbent's own moves by 0.2: allowed.
    fleet.shadow("edge-3", rollout_id, rates=(0.3, 0.15), floor=(0.95, 0.2))
    fleet.clock.advance(61)
    fleet.controller.tick()
    states = fleet.states(rollout_id)
    # Passed: promoted from shadow to serving (installing it as the served model).
    assert states == {"edge-0": "installing", "edge-1": "failed", "edge-2": "failed",
                      "edge-3": "installing"}, states  # fmt: skip
    targets = {t.device_id: t for t in fleet.store.rollout_targets(rollout_id)}
    detail = targets[fleet.ids["edge-1"]].detail
    assert "agreement 0.869 < 0.9 (the incumbent with itself: 0.980)" in detail, detail
    assert targets[fleet.ids["edge-0"]].shadow_self_agreement == pytest.approx(0.86)


def test_latency_is_judged_on_its_tail_only_with_enough_samples(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=60, max_failure_fraction=1.0)
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    # 40 timed batches: one hiccup of a busy machine makes the p99 4x (issue 15's 3.79 and
    # 5.93), the medians are even; judged on the medians, it passes.
    fleet.shadow("edge-0", rollout_id, latency=(40.0, 10.0), p50=(9.0, 9.0), samples=40)
    # The same medians 4x apart and 30 ms more: too slow whatever the tail says.
    fleet.shadow("edge-1", rollout_id, latency=(40.0, 40.0), p50=(40.0, 10.0), samples=40)
    # 400 batches: enough for a tail, and the tail is 4x.
    fleet.shadow("edge-2", rollout_id, latency=(40.0, 10.0), p50=(9.0, 9.0), samples=400)
    # An agent that sends no sample count: its p99 is judged as before.
    fleet.shadow("edge-3", rollout_id, latency=(40.0, 10.0))
    fleet.clock.advance(61)
    fleet.controller.tick()
    states = fleet.states(rollout_id)
    assert states == {"edge-0": "installing", "edge-1": "failed", "edge-2": "failed",
                      "edge-3": "failed"}, states  # fmt: skip
    targets = {t.device_id: t for t in fleet.store.rollout_targets(rollout_id)}
    assert "latency p50 40.0 ms vs 10.0 ms" in targets[fleet.ids["edge-1"]].detail
    assert "latency p99 40.0 ms vs 10.0 ms" in targets[fleet.ids["edge-2"]].detail


def test_a_device_without_shadow_windows_fails_only_after_the_grace(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("100%",), soak_s=60, max_failure_fraction=1.0)
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
        if name != "edge-3":
            fleet.shadow(name, rollout_id)
    fleet.controller.tick()  # every install reported: the soak starts now
    fleet.clock.advance(61)
    fleet.controller.tick()
    assert fleet.states(rollout_id)["edge-3"] == "shadowing"  # waiting for its windows
    fleet.clock.advance(SETTINGS.shadow_grace.total_seconds())
    fleet.controller.tick()
    assert fleet.states(rollout_id)["edge-3"] == "failed"


def test_pause_stops_the_waves_and_resume_carries_on(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    fleet.controller.pause(rollout_id, "night shift")
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert fleet.states(rollout_id)["edge-1"] == "waiting"
    with pytest.raises(FailedPrecondition, match="not running"):
        fleet.controller.pause(rollout_id, "again")
    fleet.controller.resume(rollout_id)
    assert fleet.states(rollout_id)["edge-1"] == "installing"


def test_an_abort_sends_every_device_that_got_the_version_back_and_stays(
    fleet: Fleet,
) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    stale = fleet.store.get_rollout(rollout_id)  # what a leader read before the abort
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    rollout, desired = fleet.controller.abort(rollout_id, "changed my mind")
    assert rollout.state is RolloutState.ABORTED
    assert [(d.device_id, d.model_version, d.revert_version) for d in desired] == [
        (fleet.ids["edge-0"], "1", "2")
    ]
    assert fleet.states(rollout_id)["edge-0"] == "rolled_back"
    # The stale leader's decision cannot be written, and ticks leave it aborted.
    with pytest.raises(Exception, match="changed since it was read"):
        fleet.store.save_rollout(stale)
    for _ in range(3):
        fleet.clock.advance(60)
        assert fleet.controller.tick() == []
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.ABORTED
    with pytest.raises(FailedPrecondition, match="aborted already"):
        fleet.controller.abort(rollout_id, "twice")


def test_undo_sends_a_succeeded_rollouts_devices_back_but_not_those_a_later_one_took(
    fleet: Fleet,
) -> None:
    rollout_id = _create(fleet, ("100%",))
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert fleet.store.get_rollout(rollout_id).state is RolloutState.SUCCEEDED
    # A later rollout of version 3 takes edge-3 over.
    fleet.store.add_model(
        ModelRecord("pump", "3", f"sha256:{'3' * 64}", f"sha256:{'f' * 64}", 10, T0, {})
    )
    fleet.store.update_labels("edge-3", {"line": "9"}, [])
    later, _ = fleet.controller.create("pump", "3", "line=9", ("100%",), 0.0, Gates())
    assert fleet.desired("edge-3") is not None and fleet.desired("edge-3").rollout_id == later.id

    rollout, desired = fleet.controller.undo(rollout_id, "pump-2 misses cavitation")
    assert rollout.state is RolloutState.ABORTED
    assert rollout.reason == "undone: pump-2 misses cavitation"
    back = {d.device_id: (d.model_version, d.revert_version) for d in desired}
    assert back == {fleet.ids[n]: ("1", "2") for n in ("edge-0", "edge-1", "edge-2")}, back
    states = fleet.states(rollout_id)
    assert states == {**{n: "rolled_back" for n in ("edge-0", "edge-1", "edge-2")},
                      "edge-3": "updated"}, states  # fmt: skip
    assert fleet.desired("edge-3").model_version == "3"  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="sent back already"):
        fleet.controller.undo(rollout_id, "twice")


def test_undo_never_overwrites_a_device_a_later_rollout_took_meanwhile(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollout_id = _create(fleet, ("100%",))
    for name in fleet.ids:
        fleet.installed(name, rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    stale = {n: fleet.desired(n) for n in fleet.ids}  # what undo reads...
    fleet.store.add_model(
        ModelRecord("pump", "3", f"sha256:{'3' * 64}", f"sha256:{'f' * 64}", 10, T0, {})
    )
    fleet.store.update_labels("edge-3", {"line": "9"}, [])
    later, _ = fleet.controller.create("pump", "3", "line=9", ("100%",), 0.0, Gates())
    # ... before a later rollout took edge-3 and wrote its desired state.
    by_id = {fleet.ids[n]: d for n, d in stale.items()}
    monkeypatch.setattr(fleet.store, "get_desired", lambda device_id: by_id[device_id])
    _, desired = fleet.controller.undo(rollout_id, "raced")
    monkeypatch.undo()
    assert fleet.ids["edge-3"] not in {d.device_id for d in desired}, desired
    assert fleet.desired("edge-3").rollout_id == later.id  # type: ignore[union-attr]
    assert fleet.states(rollout_id)["edge-3"] == "updated"  # not claimed as sent back


def test_undo_of_a_running_rollout_is_an_abort(fleet: Fleet) -> None:
    rollout_id = _create(fleet, ("1", "100%"))
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    rollout, desired = fleet.controller.undo(rollout_id, "")
    assert rollout.state is RolloutState.ABORTED and rollout.reason == "undone: by an operator"
    assert [d.device_id for d in desired] == [fleet.ids["edge-0"]]
    for _ in range(2):
        fleet.clock.advance(60)
        assert fleet.controller.tick() == []


def test_reports_on_other_versions_change_nothing_and_an_unknown_outcome_fails(
    fleet: Fleet,
) -> None:
    rollout_id = _create(fleet, ("100%",))
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED, version="1")  # a rollback's
    fleet.installed("edge-0", "not-a-rollout", InstallOutcome.INSTALLED)
    fleet.installed("edge-0", rollout_id, InstallOutcome.UNKNOWN)  # a newer agent's outcome
    states = fleet.states(rollout_id)
    assert states["edge-0"] == "failed" and states["edge-1"] == "installing", states
    target = fleet.store.rollout_target(rollout_id, fleet.ids["edge-0"])
    assert target is not None and target.detail.startswith("unknown")


def test_one_active_rollout_per_device(fleet: Fleet) -> None:
    _create(fleet, ("100%",))
    with pytest.raises(FailedPrecondition, match="one active rollout per device"):
        _create(fleet, ("100%",))


@settings(max_examples=200, deadline=None)
@given(
    devices=st.integers(min_value=1, max_value=500),
    sizes=st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=5),
)
def test_waves_cover_every_device_once_and_never_shrink(devices: int, sizes: list[int]) -> None:
    cumulative = sorted(sizes)
    waves = [f"{p}%" for p in cumulative[:-1]] + ["100%"]
    counts = parse_waves(waves, devices)
    assert sum(counts) == devices and all(c >= 0 for c in counts)
    reached = [sum(counts[: i + 1]) for i in range(len(counts))]
    for pct, reach in zip(cumulative[:-1], reached, strict=False):
        assert reach >= devices * pct / 100 - 1e-9  # a wave reaches at least its share


@pytest.mark.parametrize(
    ("waves", "message"),
    [
        (["50%", "10%", "100%"], "must not shrink"),
        (["0", "100%"], "device count >= 1"),
        (["1", "50%"], "end with 100%"),
        ([], "at least one wave"),
    ],
)
def test_bad_wave_lists_are_clear_errors(waves: list[str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_waves(waves, 10)


def test_a_waiting_rollout_says_what_it_waits_for(fleet: Fleet) -> None:
    names = {v: k for k, v in fleet.ids.items()}

    def waits(rollout_id: str) -> str:
        store = fleet.store
        return waiting_for(
            store.get_rollout(rollout_id),
            store.rollout_targets(rollout_id),
            names,
            fleet.clock(),
            SETTINGS,
        )

    rollout_id = _create(fleet, ("2", "100%"), soak_s=300, min_shadow_windows=20)
    assert waits(rollout_id) == (
        "install reports from edge-0, edge-1 (2 of 2 in wave 0; a device without one fails "
        "at 12:15:00Z)"
    )
    fleet.installed("edge-0", rollout_id, InstallOutcome.INSTALLED)
    assert waits(rollout_id).startswith("install reports from edge-1 (1 of 2")
    fleet.installed("edge-1", rollout_id, InstallOutcome.INSTALLED)
    fleet.controller.tick()
    assert waits(rollout_id) == "the soak of wave 0 to end at 12:05:00Z"
    fleet.shadow("edge-0", rollout_id, windows=25)
    fleet.clock.advance(301)
    assert waits(rollout_id) == (
        "shadow windows from edge-1 (each needs 20; a device without them fails at 12:15:00Z)"
    )
    fleet.controller.pause(rollout_id, "night shift")
    assert waits(rollout_id) == "an operator's resume (paused: night shift)"
    fleet.controller.abort(rollout_id, "done")
    assert waits(rollout_id) == ""
