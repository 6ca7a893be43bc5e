"""Staged rollouts: a reconciliation loop over desired and reported model versions.

A rollout freezes its targets (devices matching the selector at creation) into waves. Each
tick looks at the running rollouts in the store and moves each one on:

  start the wave: online targets get the new version as their desired state (in shadow when
  there is a soak), offline ones are deferred -> wait for install reports -> soak -> judge
  the gates on every target of the wave (install and self-test failures, the agent's error
  count, inference latency against the incumbent, and the model-behaviour gate: agreement
  and alert-rate difference of the shadow model against the incumbent on the same windows)
  -> promote (serve the new version; deferred targets get it too and install when they come
  back) -> next wave.

Past `max_failure_fraction` of the targets started so far the rollout aborts by itself:
every target that received the new version is sent back to its previous one. Devices'
install and shadow reports move their targets in `cloud/rollout_reports.py`. All state is in
the store, so a restarted control plane carries on where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from cloud.clock import Clock, utc_now
from cloud.domain import (
    DesiredModel,
    DeviceRecord,
    DeviceState,
    DeviceSummary,
    Gates,
    InstallReport,
    ModelRecord,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    ShadowReport,
    TargetState,
    Wave,
)
from cloud.rollout_reports import RolloutReports
from cloud.rollout_rules import (
    DEFAULT_WAVES,
    RolloutSettings,
    behaviour_gate,
    check_gates,
    latency_regression,
    parse_waves,
)
from cloud.rollout_targets import (
    GATE,
    agent_errors,
    desired_state,
    failures,
    moved,
    summaries,
)
from cloud.selectors import parse_selector
from cloud.store import Store
from edge_agent.errors import Conflict, FailedPrecondition, InvalidInput, NotFound
from edge_agent.logs import ids

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5  # an operator action or a report against concurrent writers
_T = TypeVar("_T")


class RolloutController:
    """Creates and moves rollouts. Every method returns the desired states it changed, for
    the caller to push to the devices' live sessions (devices offline get them on hello)."""

    def __init__(self, store: Store, settings: RolloutSettings, clock: Clock = utc_now) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()  # ticks and reports read-modify-write the same targets
        self.ticks = 0  # reconciliation passes so far
        self.reports = RolloutReports(store, clock)  # devices' reports, under the same lock

    # ---- operator actions ----
    def create(
        self,
        model_name: str,
        model_version: str,
        selector: str,
        waves: Sequence[str],
        soak_s: float,
        gates: Gates,
    ) -> tuple[RolloutRecord, list[DesiredModel]]:
        model = self.store.get_model(model_name, model_version)
        if soak_s < 0:
            raise InvalidInput("--soak must not be negative")
        check_gates(gates)
        now = self.clock()
        devices = [
            d
            for d in self.store.list_devices(parse_selector(selector))
            if d.state is DeviceState.ACTIVE
        ]
        if not devices:
            raise FailedPrecondition(f"no enrolled device matches the selector {selector!r}")
        counts = parse_waves(list(waves or DEFAULT_WAVES), len(devices))
        # Canaries: online devices first, then by name, so the first wave can report soon.
        devices.sort(key=lambda d: (not self._online(d, now), d.name))
        rollout_id = str(uuid.uuid4())
        targets: list[RolloutTarget] = []
        position = 0
        for index, count in enumerate(counts):
            for device in devices[position : position + count]:
                targets.append(
                    RolloutTarget(
                        rollout_id=rollout_id,
                        device_id=device.id,
                        wave=index,
                        state=TargetState.WAITING,
                        previous_name=str(device.status.get("model_name", "")),
                        previous_version=str(device.status.get("model_version", "")),
                        updated_at=now,
                    )
                )
            position += count
        rollout = RolloutRecord(
            id=rollout_id,
            model_name=model.name,
            model_version=model.version,
            selector=selector,
            state=RolloutState.RUNNING,
            waves=tuple(
                Wave(index=i, size=s.strip(), target=c)
                for i, (s, c) in enumerate(zip(waves or DEFAULT_WAVES, counts, strict=True))
            ),
            current_wave=0,
            soak_s=soak_s,
            gates=gates,
            reason="",
            created_at=now,
            updated_at=now,
        )
        with self._lock:
            self.store.create_rollout(rollout, targets)
            log.info(
                "rollout %s of %s:%s to %d device(s) in waves %s",
                rollout_id,
                model.name,
                model.version,
                len(targets),
                counts,
            )
            try:
                return self._advance(rollout)
            except Conflict:  # a leader on another replica moved it first: it carries on
                return self.store.get_rollout(rollout_id), []

    def pause(self, rollout_id: str, reason: str) -> RolloutRecord:
        def attempt() -> RolloutRecord:
            rollout = self.store.get_rollout(rollout_id)
            if rollout.state is not RolloutState.RUNNING:
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state}, not running")
            rollout = self._with(rollout, state=RolloutState.PAUSED, reason=reason or "paused")
            return self.store.save_rollout(rollout)[0]

        return self._retried(attempt)

    def resume(self, rollout_id: str) -> tuple[RolloutRecord, list[DesiredModel]]:
        def attempt() -> tuple[RolloutRecord, list[DesiredModel]]:
            rollout = self.store.get_rollout(rollout_id)
            if rollout.state is not RolloutState.PAUSED:
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state}, not paused")
            rollout = self._with(rollout, state=RolloutState.RUNNING, reason="")
            return self.store.save_rollout(rollout)[0], []

        rollout, _ = self._retried(attempt)
        with self._lock:
            try:
                return self._advance(rollout)
            except Conflict:  # the leader moved it first; it carries on from there
                return self.store.get_rollout(rollout_id), []

    def abort(self, rollout_id: str, reason: str) -> tuple[RolloutRecord, list[DesiredModel]]:
        def attempt() -> tuple[RolloutRecord, list[DesiredModel]]:
            rollout = self.store.get_rollout(rollout_id)
            if not rollout.state.active:
                raise FailedPrecondition(f"rollout {rollout_id} is {rollout.state} already")
            return self._abort(rollout, reason or "aborted by an operator")

        return self._retried(attempt)

    def undo(self, rollout_id: str, reason: str) -> tuple[RolloutRecord, list[DesiredModel]]:
        """Sends the devices the rollout updated back to their previous version: after it
        succeeded or ended partial, and, like an abort, while it runs. A device a later
        rollout took over keeps what it has; the rollout ends aborted, its reason saying so."""

        def attempt() -> tuple[RolloutRecord, list[DesiredModel]]:
            rollout = self.store.get_rollout(rollout_id)
            if rollout.state is RolloutState.ABORTED:
                raise FailedPrecondition(
                    f"rollout {rollout_id} is aborted: its devices were sent back already"
                )
            return self._abort(rollout, "undone: " + (reason or "by an operator"))

        return self._retried(attempt)

    def _retried(self, attempt: Callable[[], _T]) -> _T:
        """An operator's action, read and written again when another writer (the leader's
        tick on any replica, a device report) changed the rollout in between: the action
        always applies to what is stored, and a stale decision is never written."""
        for _ in range(CONFLICT_RETRIES - 1):
            with self._lock:
                try:
                    return attempt()
                except Conflict as exc:
                    log.info("retrying after a concurrent change: %s", exc)
        with self._lock:
            return attempt()

    # ---- reconciliation ----
    def tick(self) -> list[DesiredModel]:
        """One pass over every running rollout."""
        self.ticks += 1
        changed: list[DesiredModel] = []
        for rollout in self.store.list_rollouts(active_only=True):
            if rollout.state is not RolloutState.RUNNING:
                continue
            with self._lock:
                try:
                    changed.extend(self._advance(self.store.get_rollout(rollout.id))[1])
                except Conflict as exc:  # an operator or a report came first: next tick
                    log.info(
                        "rollout %s: %s; deciding again on the next tick",
                        rollout.id,
                        exc,
                        extra=ids(rollout=rollout.id),
                    )
                except Exception:
                    log.exception("rollout %s: reconciliation failed; retrying", rollout.id)
        return changed

    def on_install(self, device_id: str, report: InstallReport) -> None:
        """Records what a device says about installing a rollout's version. A report on a
        rollout that is unknown, not the device's or of another version is dropped after a
        read, without the lock (a device repeating one holds up no tick or operator)."""
        if self.reports.concerns(device_id, report.rollout_id, report.model_version):
            self._retried(lambda: self.reports.on_install(device_id, report))

    def on_shadow(self, device_id: str, report: ShadowReport) -> None:
        """Records a device's shadow statistics on a rollout's version (dropped unlocked,
        as an install report is, when it cannot concern a target)."""
        if self.reports.concerns(device_id, report.rollout_id, report.candidate_version):
            self._retried(lambda: self.reports.on_shadow(device_id, report))

    # ---- internals (called with the lock held) ----
    def _online(self, device: DeviceRecord | DeviceSummary, now: dt.datetime) -> bool:
        return device.is_online(now, self.settings.offline_after)

    def _advance(self, rollout: RolloutRecord) -> tuple[RolloutRecord, list[DesiredModel]]:
        """Moves a running rollout as far as it can go now."""
        changed: list[DesiredModel] = []
        while rollout.state is RolloutState.RUNNING:
            before = rollout
            rollout, desired = self._step(rollout)
            changed.extend(desired)
            if rollout == before:
                break
        return rollout, changed

    def _step(self, rollout: RolloutRecord) -> tuple[RolloutRecord, list[DesiredModel]]:
        now = self.clock()
        targets = self.store.rollout_targets(rollout.id)
        wave = rollout.waves[rollout.current_wave]
        in_wave = [t for t in targets if t.wave == wave.index]
        shadow = rollout.soak_s > 0
        if wave.started_at is None:
            model = self.store.get_model(rollout.model_name, rollout.model_version)
            devices = summaries(self.store, (t.device_id for t in in_wave))
            updated, desired = [], []
            for t in in_wave:
                device = devices.get(t.device_id)
                if device is not None and self._online(device, now):
                    desired.append(
                        desired_state(model, rollout.id, t.device_id, shadow, self.clock())
                    )
                    updated.append(moved(t, TargetState.INSTALLING, "desired state sent", now))
                else:
                    updated.append(moved(t, TargetState.DEFERRED, "offline; installs later", now))
            rollout = self._with_wave(rollout, wave, started_at=now)
            rollout, desired = self.store.save_rollout(rollout, updated, desired)
            log.info(
                "rollout %s: wave %d started (%d device(s))", rollout.id, wave.index, len(desired)
            )
            return rollout, desired

        timed_out = [
            moved(t, TargetState.FAILED, "no install report in time", now)
            for t in in_wave
            if t.state is TargetState.INSTALLING
            and t.updated_at is not None
            and now - t.updated_at > self.settings.install_timeout
        ]
        if timed_out:
            return self.store.save_rollout(self._with(rollout), timed_out)  # targets re-read next
        if (aborted := self._failure_gate(rollout, targets)) is not None:
            return aborted
        if any(t.state is TargetState.INSTALLING for t in in_wave):
            return rollout, []
        if wave.promoted_at is not None:  # the last wave, every swap reported
            if reason := failures(self.store, targets):  # within --max-failures, not a success
                rollout = self._with(rollout, state=RolloutState.PARTIAL, reason=reason)
                log.warning(
                    "rollout %s finished with failures: %s",
                    rollout.id,
                    reason,
                    extra=ids(rollout=rollout.id),
                )
            else:
                rollout = self._with(rollout, state=RolloutState.SUCCEEDED, reason="")
                log.info("rollout %s succeeded", rollout.id, extra=ids(rollout=rollout.id))
            return self.store.save_rollout(rollout)
        if wave.installed_at is None:
            soak = dt.timedelta(seconds=rollout.soak_s)
            rollout = self._with_wave(rollout, wave, installed_at=now, soak_until=now + soak)
            return self.store.save_rollout(rollout)
        assert wave.soak_until is not None
        if now < wave.soak_until:
            return rollout, []
        if shadow:
            judged = self._judge(rollout, in_wave, now, wave.soak_until)
            if judged is None:
                return rollout, []  # waiting for shadow windows
            if judged:
                rollout, _ = self.store.save_rollout(self._with(rollout), judged)
                if aborted := self._failure_gate(rollout, self.store.rollout_targets(rollout.id)):
                    return aborted
        # Promote: serve the new version on this wave's targets.
        model = self.store.get_model(rollout.model_name, rollout.model_version)
        desired, updated = [], []
        for t in self.store.rollout_targets(rollout.id):
            if t.wave != wave.index:
                continue
            if t.state is TargetState.SHADOWING:
                desired.append(desired_state(model, rollout.id, t.device_id, False, self.clock()))
                updated.append(moved(t, TargetState.INSTALLING, "promoted; swapping", now))
            elif t.state is TargetState.DEFERRED:
                desired.append(desired_state(model, rollout.id, t.device_id, False, self.clock()))
        last = rollout.current_wave == len(rollout.waves) - 1
        rollout = self._with_wave(rollout, wave, promoted_at=now)
        if not last:
            rollout = self._with(rollout, current_wave=rollout.current_wave + 1)
        rollout, desired = self.store.save_rollout(rollout, updated, desired)
        log.info(
            "rollout %s: wave %d promoted", rollout.id, wave.index, extra=ids(rollout=rollout.id)
        )
        return rollout, desired

    def _judge(
        self,
        rollout: RolloutRecord,
        in_wave: list[RolloutTarget],
        now: dt.datetime,
        soak_until: dt.datetime,
    ) -> list[RolloutTarget] | None:
        """Gate verdicts for the wave's shadowing targets; None while data is missing."""
        gates = rollout.gates
        shadowing = [t for t in in_wave if t.state is TargetState.SHADOWING]
        devices = summaries(self.store, (t.device_id for t in shadowing))
        failed: list[RolloutTarget] = []
        waiting = False
        for t in shadowing:
            windows = t.shadow_windows
            if windows < max(gates.min_shadow_windows, 1):
                if now - soak_until < self.settings.shadow_grace:
                    waiting = True
                    continue
                short = f"{GATE}only {windows} shadow window(s) reported"
                failed.append(moved(t, TargetState.FAILED, short, now))
                continue
            agreement = t.shadow_agreement
            difference = t.shadow_alert_rate_difference
            candidate_ms, incumbent_ms, statistic = t.shadow_latency_ms
            slower = latency_regression(
                candidate_ms, incumbent_ms, gates.max_latency_regression, statistic
            )
            device = devices.get(t.device_id)
            errors = 0
            if device is not None:
                errors = agent_errors(device.health) - t.errors_at_install
            why = behaviour_gate(
                gates, agreement, difference, t.shadow_self_agreement,
                t.shadow_self_rate_difference,
            )  # fmt: skip
            if slower:
                why.append(slower)
            if t.errors_at_install >= 0 and errors > gates.max_agent_errors:
                why.append(f"{errors} agent errors during the soak > {gates.max_agent_errors}")
            if why:
                failed.append(moved(t, TargetState.FAILED, GATE + "; ".join(why), now))
        if waiting:
            return None
        return failed

    def _failure_gate(
        self, rollout: RolloutRecord, targets: list[RolloutTarget]
    ) -> tuple[RolloutRecord, list[DesiredModel]] | None:
        started = [t for t in targets if t.wave <= rollout.current_wave]
        failed = [t for t in started if t.state is TargetState.FAILED]
        if not failed or len(failed) / len(started) <= rollout.gates.max_failure_fraction:
            return None
        reason = (
            f"{len(failed)} of {len(started)} device(s) failed (limit "
            f"{rollout.gates.max_failure_fraction:.0%}); first: {failed[0].detail}"
        )
        return self._abort(rollout, reason)

    def _abort(
        self, rollout: RolloutRecord, reason: str
    ) -> tuple[RolloutRecord, list[DesiredModel]]:
        """Sends every target that got the new version back to its previous one."""
        now = self.clock()
        desired, updated = [], []
        models: dict[tuple[str, str], ModelRecord | None] = {}
        for t in self.store.rollout_targets(rollout.id):
            if t.state is TargetState.WAITING:
                continue
            current = self.store.get_desired(t.device_id)
            if current is None or current.rollout_id != rollout.id:
                continue  # never sent, or another rollout owns the device now
            key = (t.previous_name, t.previous_version)
            if t.previous_version and key not in models:
                try:
                    models[key] = self.store.get_model(*key)
                except NotFound:  # not pushed here: the agent has it in a slot or its config
                    models[key] = None
            previous = models.get(key)
            desired.append(
                DesiredModel(
                    device_id=t.device_id,
                    model_name=t.previous_name,
                    model_version=t.previous_version,
                    manifest_digest=previous.manifest_digest if previous else "",
                    signature_digest=previous.signature_digest if previous else "",
                    rollout_id=rollout.id,
                    shadow=False,
                    updated_at=now,
                    # The device decides: only if it serves the aborted version does it go
                    # back; the previous version above may be stale for one never updated.
                    revert_version=rollout.model_version,
                )
            )
            updated.append(moved(t, TargetState.ROLLED_BACK, t.detail or "rolled back", now))
        rollout = self._with(rollout, state=RolloutState.ABORTED, reason=reason)
        rollout, desired = self.store.save_rollout(rollout, updated, desired)
        log.warning("rollout %s aborted: %s", rollout.id, reason, extra=ids(rollout=rollout.id))
        return rollout, desired

    def _with(self, rollout: RolloutRecord, **changes: object) -> RolloutRecord:
        return dataclasses.replace(rollout, updated_at=self.clock(), **changes)  # type: ignore[arg-type]

    def _with_wave(self, rollout: RolloutRecord, wave: Wave, **changes: object) -> RolloutRecord:
        waves = list(rollout.waves)
        waves[wave.index] = dataclasses.replace(wave, **changes)  # type: ignore[arg-type]
        return self._with(rollout, waves=tuple(waves))
