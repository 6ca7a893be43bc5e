"""A rollout's targets: their moves between states, the desired state a target's device is
sent, and the failed ones in words. Shared by the wave planner (`cloud/rollouts.py`) and the
handling of devices' reports (`cloud/rollout_reports.py`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable

from cloud.domain import (
    DesiredModel,
    DeviceSummary,
    ModelRecord,
    RolloutState,
    RolloutTarget,
    TargetState,
)
from cloud.store import Store

GATE = "gate: "  # begins the detail of a target the gates judged (a verdict reports never undo)
# The too-few-windows verdict as control planes before the GATE prefix stored it.
_UNPREFIXED_VERDICT = re.compile(r"only \d+ shadow window\(s\) reported")
SWAPPING_LATE = "promoted late; swapping"  # sent the version to serve after its wave's promotion


def judged(t: RolloutTarget) -> bool:
    """Whether the gates failed the target: a verdict no install report undoes (also the
    too-few-windows one stored without the prefix before an upgrade)."""
    return t.state is TargetState.FAILED and (
        t.detail.startswith(GATE) or _UNPREFIXED_VERDICT.fullmatch(t.detail) is not None
    )


def moved(t: RolloutTarget, state: TargetState, detail: str, now: dt.datetime) -> RolloutTarget:
    """The target in a new state, saying why."""
    return dataclasses.replace(t, state=state, detail=detail, updated_at=now)


def desired_state(
    model: ModelRecord, rollout_id: str, device_id: str, shadow: bool, now: dt.datetime
) -> DesiredModel:
    """The rollout's version as a device's desired state, in shadow or served."""
    return DesiredModel(
        device_id=device_id,
        model_name=model.name,
        model_version=model.version,
        manifest_digest=model.manifest_digest,
        signature_digest=model.signature_digest,
        rollout_id=rollout_id,
        shadow=shadow,
        updated_at=now,
    )


def summaries(store: Store, device_ids: Iterable[str]) -> dict[str, DeviceSummary]:
    """The few columns a step needs of these devices only (a tick reads no device when
    nothing waits on one: whole-fleet reads cost most of a CPU-second at 10,000)."""
    wanted = set(device_ids)
    return {d.id: d for d in store.device_summaries(wanted)} if wanted else {}


def failures(store: Store, targets: list[RolloutTarget]) -> str:
    """The failed targets in words (the reason a rollout ended partial); "" for none."""
    failed = [t for t in targets if t.state is TargetState.FAILED]
    if not failed:
        return ""
    devices = summaries(store, (t.device_id for t in failed[:5]))
    names = ", ".join(
        f"{devices[t.device_id].name if t.device_id in devices else t.device_id} ({t.detail})"
        for t in failed[:5]
    )
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return f"{len(failed)} of {len(targets)} device(s) failed: {names}{more}"


def ended(store: Store, targets: list[RolloutTarget]) -> tuple[RolloutState, str]:
    """How a rollout that went through every wave stands, with its reason: partial while a
    device failed or still swaps to the version it was sent to serve after the rollout
    ended; succeeded otherwise."""
    reasons = [failures(store, targets)]
    swapping = [t for t in targets if t.state is TargetState.INSTALLING]
    if swapping:
        devices = summaries(store, (t.device_id for t in swapping[:5]))
        names = ", ".join(
            devices[t.device_id].name if t.device_id in devices else t.device_id
            for t in swapping[:5]
        )
        more = f" and {len(swapping) - 5} more" if len(swapping) > 5 else ""
        reasons.append(
            f"{len(swapping)} of {len(targets)} device(s) sent the version to serve, "
            f"not serving it yet: {names}{more}"
        )
    reason = "; ".join(r for r in reasons if r)
    return (RolloutState.PARTIAL if reason else RolloutState.SUCCEEDED), reason


def agent_errors(health: object) -> int:
    """The error count in the health a device last reported; 0 where it is not one."""
    try:
        return int(health.get("errors", 0)) if isinstance(health, dict) else 0
    except (TypeError, ValueError, OverflowError):
        return 0
