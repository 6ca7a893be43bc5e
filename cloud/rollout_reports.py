"""Devices' reports on a rollout: install outcomes and shadow statistics move their targets.

An install reported later counts, also after a failure (not after a gate's verdict or an
abort). A device whose disk does not take the install (its agent says it tries again) is no
failure: it waits as deferred. A device that installs in shadow after its wave was promoted,
also after the rollout ended, is sent the version to serve. A report after an abort is kept in
the target's detail only.
"""

from __future__ import annotations

import dataclasses
import logging

from cloud.clock import Clock
from cloud.domain import (
    InstallOutcome,
    InstallReport,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    ShadowReport,
    TargetState,
)
from cloud.rollout_targets import (
    SWAPPING_LATE,
    agent_errors,
    desired_state,
    ended,
    judged,
    moved,
)
from cloud.sparse_log import SparseLog
from cloud.store import Store
from edge_agent.errors import NotFound
from edge_agent.logs import ids

log = logging.getLogger(__name__)


class RolloutReports:
    """Applies what devices report about a rollout's version to their targets in the store.
    Not locked itself: the controller asks `concerns` first, unlocked, then calls the rest with
    its lock held and retries on conflict. What a report makes it log is logged sparsely
    (`SparseLog`): a device repeating one cannot flood the log."""

    def __init__(self, store: Store, clock: Clock, sparse: SparseLog | None = None) -> None:
        self.store = store
        self.clock = clock
        self.sparse = sparse or SparseLog(log)

    def concerns(self, device_id: str, rollout_id: str, version: str) -> bool:
        """Whether a report of `device_id` on `rollout_id` about `version` may move its
        target: the rollout exists, targets the device and rolls out that version. Only reads
        (no write transaction, no lock): a report on an unknown rollout, or one the device is
        not in, costs a read or two."""
        found = self._target(rollout_id, device_id)
        return found is not None and found[0].model_version == version

    def on_install(self, device_id: str, report: InstallReport) -> None:
        """Records what a device says about installing a rollout's version."""
        found = self._target(report.rollout_id, device_id)
        if found is None:
            return
        rollout, target = found
        if report.model_version != rollout.model_version:
            return  # a report about a rollback or an older version
        if rollout.state is RolloutState.ABORTED or target.state is TargetState.ROLLED_BACK:
            self._after_abort(target, report)
        elif report.outcome is InstallOutcome.INSTALLED:
            self._installed(rollout, target, report)
        elif report.retrying:
            self._retrying(rollout, target, report)
        else:
            target = moved(target, TargetState.FAILED, _summary(report), self.clock())
            self.sparse.warning(
                device_id,
                f"install failed ({rollout.id})",
                "rollout %s: device %s failed: %s",
                rollout.id,
                device_id,
                target.detail,
                extra=ids(rollout=rollout.id, device=device_id),
            )
            self.store.save_target(target)

    def _installed(
        self, rollout: RolloutRecord, target: RolloutTarget, report: InstallReport
    ) -> None:
        """The device installed the version: the target moves on from waiting for it, and
        from an install failure (a timeout, a download that failed and later worked); a
        gate's verdict on it stands."""
        if target.state not in (TargetState.INSTALLING, TargetState.DEFERRED, TargetState.FAILED):
            return  # a report resent after a reconnect
        if judged(target):
            return  # resent after the gate judged it
        device_id, now = target.device_id, self.clock()
        desired = self.store.get_desired(device_id)
        shadow = desired is not None and desired.shadow
        wave = rollout.waves[target.wave]
        # Its wave's soak began without it (an ended rollout promoted every wave).
        if shadow and (wave.installed_at is not None or not rollout.state.active):
            if wave.promoted_at is None:  # served when the wave is, like an offline device
                late = "installed in shadow after its wave's soak began; serves it at promotion"
                if (target.state, target.detail) != (TargetState.DEFERRED, late):
                    self.store.save_target(moved(target, TargetState.DEFERRED, late, now))
                return
            if desired is None or desired.rollout_id != rollout.id:
                return  # a later rollout took the device after this one ended: a stale report
            self._serve_late(rollout, moved(target, TargetState.INSTALLING, SWAPPING_LATE, now))
            return
        device = self.store.get_device(device_id)
        if report.serving_version and report.serving_version != rollout.model_version:
            # What it really served: the status read at creation may be stale.
            target = dataclasses.replace(
                target,
                previous_name=report.serving_name,
                previous_version=report.serving_version,
            )
        if target.state is TargetState.FAILED:
            log.info(
                "rollout %s: device %s installed the version after failing (%s)",
                rollout.id,
                device_id,
                target.detail,
                extra=ids(rollout=rollout.id, device=device_id),
            )
        target = dataclasses.replace(
            target,
            state=TargetState.SHADOWING if shadow else TargetState.UPDATED,
            detail=f"installed ({report.backend})",
            errors_at_install=agent_errors(device.status.get("health")),
            updated_at=now,
        )
        if rollout.state is RolloutState.PARTIAL:  # ended with failures: one fewer now
            self.store.save_rollout(self._recounted(rollout, target), [target])
            return
        self.store.save_target(target)

    def _serve_late(self, rollout: RolloutRecord, target: RolloutTarget, send: bool = True) -> None:
        """Its wave was promoted without it: with `send`, the device is sent the version to
        serve, as a deferred one was at promotion. Its desired state was this rollout's
        shadow one when read; the store writes it only if it still is (Conflict otherwise:
        a rollout created since, on any replica, took the device, and the report is judged
        again on what is stored). A partial rollout is recounted with `target` (it says it
        waits for the device, or has one failure fewer)."""
        served = []
        if send:
            model = self.store.get_model(rollout.model_name, rollout.model_version)
            served.append(desired_state(model, rollout.id, target.device_id, False, self.clock()))
        if rollout.state is RolloutState.PARTIAL:
            rollout = self._recounted(rollout, target)
        self.store.save_rollout(rollout, [target], served, from_shadow=send)

    def _recounted(self, rollout: RolloutRecord, target: RolloutTarget) -> RolloutRecord:
        """An ended rollout's state and reason with one target moved."""
        targets = [
            target if t.device_id == target.device_id else t
            for t in self.store.rollout_targets(rollout.id)
        ]
        state, reason = ended(self.store, targets)
        if (state, reason) == (rollout.state, rollout.reason):
            return rollout
        return dataclasses.replace(rollout, state=state, reason=reason, updated_at=self.clock())

    def _retrying(
        self, rollout: RolloutRecord, target: RolloutTarget, report: InstallReport
    ) -> None:
        """The device's disk did not take the install and the agent tries again: no verdict
        on the version, so not a failure against the budget. The target waits as deferred
        (the wave goes on without it; it gets the version when the wave is promoted) and
        says why."""
        if target.state is TargetState.WAITING or judged(target):
            return
        detail = _summary(report)
        if (target.state, target.detail) == (TargetState.DEFERRED, detail):
            return  # resent after a reconnect
        self.sparse.warning(
            target.device_id,
            f"install deferred ({rollout.id})",
            "rollout %s: device %s cannot install yet and tries again: %s",
            rollout.id,
            target.device_id,
            detail,
            extra=ids(rollout=rollout.id, device=target.device_id),
        )
        target = moved(target, TargetState.DEFERRED, detail, self.clock())
        if rollout.state.active:
            self.store.save_target(target)
            return
        # Ended: every wave was promoted, so it waits to serve the version, as a device
        # deferred at promotion does; a partial rollout has one failure fewer.
        desired = self.store.get_desired(target.device_id)
        in_shadow = desired is not None and desired.rollout_id == rollout.id and desired.shadow
        self._serve_late(rollout, target, send=in_shadow)

    def _after_abort(self, target: RolloutTarget, report: InstallReport) -> None:
        """A report that came after the rollout was aborted (or the device sent back): kept
        in the target's detail; the target stays where the abort left it."""
        if report.outcome is InstallOutcome.INSTALLED:
            what = f"installed ({report.backend})"
        else:
            what = _summary(report)
        detail = f"reported after the abort: {what}"[:500]
        if target.detail != detail:
            self.store.save_target(moved(target, target.state, detail, self.clock()))

    def on_shadow(self, device_id: str, report: ShadowReport) -> None:
        """Records a device's shadow statistics on a rollout's version. The agent compares the
        two models on the newest unbroken run of rows it holds, so its count starts again
        from 0 after a restart or a gap in the data: a report of too few windows for the gate
        does not replace one that measured more (a report of enough windows does: it is the
        newer measure)."""
        found = self._target(report.rollout_id, device_id)
        if found is None:
            return
        rollout, _ = found
        if report.candidate_version != rollout.model_version:
            return
        shadow = {
            "windows": report.windows,
            "agreement": report.agreement,
            "alert_rate_candidate": report.alert_rate_candidate,
            "alert_rate_incumbent": report.alert_rate_incumbent,
            "latency_p99_ms": report.latency_p99_ms,
            "incumbent_latency_p99_ms": report.incumbent_latency_p99_ms,
            "latency_p50_ms": report.latency_p50_ms,
            "incumbent_latency_p50_ms": report.incumbent_latency_p50_ms,
            "latency_samples": report.latency_samples,
            "detail": report.detail,
            "self_agreement": report.self_agreement,
            "self_rate_difference": report.self_rate_difference,
        }
        enough = max(rollout.gates.min_shadow_windows, 1)
        if not self.store.record_shadow(rollout.id, device_id, shadow, enough):
            self.sparse.info(
                device_id,
                f"fewer shadow windows ({rollout.id})",
                "rollout %s: device %s reported %d shadow window(s) (%r), fewer than before "
                "and than the gate needs (%d), as after an agent restart: the earlier "
                "report stands",
                rollout.id,
                device_id,
                report.windows,
                report.detail,
                enough,
                extra=ids(rollout=rollout.id, device=device_id),
            )

    def _target(
        self, rollout_id: str, device_id: str
    ) -> tuple[RolloutRecord, RolloutTarget] | None:
        """The rollout and the device's target in it; None for no rollout or an unknown one,
        or a device that is no target of it."""
        if not rollout_id:
            return None
        try:
            rollout = self.store.get_rollout(rollout_id)
        except NotFound:  # an unknown rollout id from a device: ignored
            self.sparse.warning(
                device_id,
                "unknown rollout",
                "device %s reported on unknown rollout %s",
                device_id,
                rollout_id[:64],
                extra=ids(device=device_id),
            )
            return None
        target = self.store.rollout_target(rollout_id, device_id)
        return (rollout, target) if target is not None else None


def _summary(report: InstallReport) -> str:
    """What a report that is not an install says, for a target's detail."""
    return f"{report.outcome.value}: {report.detail}"[:500]
