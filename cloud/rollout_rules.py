"""The rules rollouts follow, as pure functions: wave sizes, the gates' checks and judgements,
and what a rollout waits for. `cloud/rollouts.py` applies them to the store."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cloud.domain import Gates, RolloutRecord, RolloutState, RolloutTarget, TargetState
from edge_agent.errors import InvalidInput

DEFAULT_WAVES = ("1", "10%", "50%", "100%")
# p99 per window: a candidate slower by less than this passes whatever the ratio. Both models
# are timed on a shared, often busy device; a few milliseconds against a sampling period of a
# second or more are scheduling noise (ratios of 2-3 between two equal models were seen).
LATENCY_FLOOR_MS = 5.0


@dataclass(frozen=True)
class RolloutSettings:
    offline_after: dt.timedelta
    install_timeout: dt.timedelta = dt.timedelta(minutes=15)
    # After the soak, how long to wait for shadow windows before counting a target failed.
    shadow_grace: dt.timedelta = dt.timedelta(minutes=10)


def parse_waves(sizes: Sequence[str], devices: int) -> list[int]:
    """Devices per wave (not cumulative) for `devices` targets; sizes are counts ("1") or
    percentages ("10%") of all targets, cumulative and increasing, the last covering all."""
    if not sizes:
        raise InvalidInput("--waves needs at least one wave, e.g. 1,10%,50%,100%")
    cumulative: list[int] = []
    last_pct = 0.0
    for text in sizes:
        text = text.strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                if pct < last_pct:  # shrinks as written, whatever the fleet's size
                    raise InvalidInput(f"wave sizes must not shrink: {text!r} after {last_pct:g}%")
                last_pct = pct
                reach = math.ceil(devices * pct / 100.0 - 1e-9)
            else:
                reach = int(text)
                if reach < 1:
                    raise ValueError
        except ValueError:
            raise InvalidInput(
                f"wave size {text!r} must be a device count >= 1 or a percentage in (0, 100]"
            ) from None
        if cumulative and reach < cumulative[-1]:
            raise InvalidInput(f"wave sizes must not shrink: {text!r} after a larger wave")
        cumulative.append(min(reach, devices))
    last = sizes[-1].strip()
    if not (last.endswith("%") and float(last[:-1]) == 100) and cumulative[-1] < devices:
        raise InvalidInput(
            f"the last wave ({last}) reaches {cumulative[-1]} of {devices} devices; end with 100%"
        )
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]


def waiting_for(
    rollout: RolloutRecord,
    targets: Sequence[RolloutTarget],
    names: dict[str, str],
    now: dt.datetime,
    settings: RolloutSettings,
) -> str:
    """What a rollout is waiting for now, in words ("" when it waits for nothing): the
    devices whose reports it needs, and when it stops waiting for them."""
    if rollout.state is RolloutState.PAUSED:
        return f"an operator's resume (paused: {rollout.reason or 'no reason given'})"
    if rollout.state is not RolloutState.RUNNING:
        return ""
    wave = rollout.waves[rollout.current_wave]
    in_wave = [t for t in targets if t.wave == wave.index]

    def listed(ts: Sequence[RolloutTarget]) -> str:
        named = sorted(names.get(t.device_id, t.device_id) for t in ts)
        return ", ".join(named[:5]) + (f" and {len(ts) - 5} more" if len(ts) > 5 else "")

    if wave.started_at is None:
        return f"the next reconciliation to start wave {wave.index}"
    installing = [t for t in in_wave if t.state is TargetState.INSTALLING]
    if installing:
        first = min((t.updated_at for t in installing if t.updated_at), default=now)
        deadline = first + settings.install_timeout
        return (
            f"install reports from {listed(installing)} ({len(installing)} of {len(in_wave)} "
            f"in wave {wave.index}; a device without one fails at {deadline:%H:%M:%S}Z)"
        )
    if wave.soak_until is not None and now < wave.soak_until:
        return f"the soak of wave {wave.index} to end at {wave.soak_until:%H:%M:%S}Z"
    if wave.soak_until is not None and rollout.soak_s > 0:
        need = max(rollout.gates.min_shadow_windows, 1)
        short = [t for t in in_wave if t.state is TargetState.SHADOWING and t.shadow_windows < need]
        if short:
            deadline = wave.soak_until + settings.shadow_grace
            return (
                f"shadow windows from {listed(short)} (each needs {need}; a device without "
                f"them fails at {deadline:%H:%M:%S}Z)"
            )
    return f"the next reconciliation to judge and promote wave {wave.index}"


def latency_regression(
    candidate_ms: float, incumbent_ms: float, max_ratio: float, statistic: str = "p99"
) -> str:
    """Why the candidate is too slow, or "" when it is not (or nothing was measured)."""
    if incumbent_ms <= 0 or candidate_ms - incumbent_ms < LATENCY_FLOOR_MS:
        return ""
    ratio = candidate_ms / incumbent_ms
    if ratio <= max_ratio:
        return ""
    return (
        f"latency {statistic} {candidate_ms:.1f} ms vs {incumbent_ms:.1f} ms, ratio {ratio:.2f} > "
        f"{max_ratio:g}"
    )


def behaviour_gate(
    gates: Gates,
    agreement: float,
    rate_difference: float,
    self_agreement: float,
    self_rate_difference: float,
) -> list[str]:
    """Why the candidate's decisions differ too much from the incumbent's ([] when they do
    not), judged against the noise floor the device measured: the incumbent against itself
    recalibrated on other rows. Where the incumbent agrees with itself less than the gate
    asks, the gate asks only that much; where its alert rate moves more than allowed, that
    much is allowed. A floor of 0 (not measured: an older agent, too few rows) leaves the
    configured gates as they are."""
    why = []
    need = gates.min_shadow_agreement
    if 0 < self_agreement < need:
        need = self_agreement
    if agreement < need:
        floor = f" (the incumbent with itself: {self_agreement:.3f})" if self_agreement else ""
        why.append(f"agreement {agreement:.3f} < {need:.3g}{floor}")
    allowed = max(gates.max_alert_rate_difference, self_rate_difference)
    if rate_difference > allowed:
        why.append(f"alert-rate difference {rate_difference:.3f} > {allowed:.3g}")
    return why


def check_gates(gates: Gates) -> None:
    for name in ("max_failure_fraction", "min_shadow_agreement", "max_alert_rate_difference"):
        value = getattr(gates, name)
        if not 0 <= value <= 1:
            raise InvalidInput(f"gate {name} must be between 0 and 1, got {value}")
    if gates.max_latency_regression <= 0:
        raise InvalidInput("gate max_latency_regression must be > 0 (a p99 ratio)")
