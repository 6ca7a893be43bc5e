"""An agent's status against the plane's bounds (`cloud.service.bounds`): a status as large as
a real agent sends passes; lists longer than the agent ever sends are refused before each
entry is checked; a bad entry deep in a map is still named."""

from __future__ import annotations

import math

import pytest

from cloud.service.bounds import MESSAGE_BYTES, REPEATED_LIMITS, check_message
from edge_agent import losses
from edge_agent.errors import InvalidInput
from edge_agent.health import _REPORTED
from edge_agent.wire import lost_records
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit
HEALTH = "autoglm.v1.AgentHealth"


def _limit(field: str) -> int:
    return REPEATED_LIMITS[f"{HEALTH}.{field}"]


def _real_losses() -> list[agent_pb2.LostRecords]:
    """What the agent's own loss log and encoder send after many more losses than it keeps."""
    log = losses.LossLog()
    for i in range(3 * losses.KEPT):
        log.gap(1_790_000_000.0 + 10 * i, 1_790_000_005.0 + 10 * i, 7, losses.UNCLEAN_STOP)
    log.lost(3, 1_790_001_000.0)  # one ongoing too
    return lost_records(log.recent())


def _status(assets: int, skewed: int) -> agent_pb2.AgentStatus:
    """A status of an agent of `assets` assets, each calibrated (drift), its stream clock off
    and every drop reason counted: the maps as full as the agent fills them, names of the
    length real sites use (16 characters, sensors 24)."""
    health = agent_pb2.AgentHealth()
    for a in range(assets):
        name = f"line-4/press-{a:03d}"[:16]
        health.ingest_rate_per_s[name] = 812.5
        health.clock_offset_s[name] = -3.5
        drift = health.drift[name]
        drift.input_shift, drift.input_shift_sensor = 4.25, f"bearing-{a:03d}-temperature"[:24]
        drift.spread_ratio, drift.masked_fraction, drift.score_median = 1.75, 0.02, 0.4
        drift.alerts_per_day, drift.rows = 1.5, 3000
    for i in range(skewed):
        health.sensor_clock_offset_s[f"line-4/press-{i % assets:03d}/sensor-{i:04d}"] = 12.5
    for reason in _REPORTED:
        health.dropped_by_reason[reason] = 2**40
    health.lost_records.extend(_real_losses())
    health.outbox_unavailable = "the outbox could not be opened: disk I/O error " * 4
    return agent_pb2.AgentStatus(
        model_name="press-anomaly", model_version="2026.11.1", inference_backend="tensorrt",
        uptime_seconds=86_400.0 * 400, slot="b", signing_root_version=3,
        certificate_issuer="ab" * 32, health=health,
    )  # fmt: skip


def test_the_agents_own_caps_fit_the_planes() -> None:
    assert len(_real_losses()) == losses.KEPT <= _limit("lost_records")
    assert len(_REPORTED) <= _limit("dropped_by_reason")
    per_asset = {_limit(f) for f in ("ingest_rate_per_s", "clock_offset_s", "drift")}
    assert len(per_asset) == 1, "every map by asset takes the same number of assets"


def test_a_status_as_large_as_a_real_agents_passes() -> None:
    """The most assets any map by asset takes, every one calibrated, and a skewed sensor on
    each: within the status's byte cap, and passed."""
    status = _status(assets=_limit("drift"), skewed=_limit("drift"))
    assert status.ByteSize() <= MESSAGE_BYTES["autoglm.v1.AgentStatus"], status.ByteSize()
    check_message(status, "status")
    check_message(agent_pb2.AgentStatus(health=agent_pb2.AgentHealth()), "status")


@pytest.mark.parametrize(
    ("field", "grow", "message"),
    [
        ("lost_records", lambda h: h.lost_records.add(records=1), "21 entries > 20"),
        ("drift", lambda h: h.drift[f"extra-{len(h.drift)}"].SetInParent(), "257 entries > 256"),
    ],
)
def test_longer_lists_than_an_agent_sends_are_refused(
    field: str, grow: object, message: str
) -> None:
    """Before: 1,000 lost stretches and 1,000 drift entries were taken, each checked in turn
    on the event loop (the proto says at most 20 stretches; a map by asset holds at most
    256 assets in the plane's other maps)."""
    status = _status(assets=_limit("drift"), skewed=0)
    while len(getattr(status.health, field)) <= _limit(field):
        grow(status.health)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=f"^status.health.{field}: {message}$"):
        check_message(status, "status")


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (
            lambda h: h.sensor_clock_offset_s.__setitem__("line-4/press-007/sensor-0007", math.nan),
            "status.health.sensor_clock_offset_s['line-4/press-007/sensor-0007']: nan is not a "
            "finite number",
        ),
        (
            lambda h: h.ingest_rate_per_s.__setitem__("bad\x00asset", 1.0),
            "status.health.ingest_rate_per_s['bad\\x00asset']: contains a NUL character",
        ),
        (
            lambda h: h.drift["line-4/press-003"].__setattr__("spread_ratio", math.inf),
            "status.health.drift['line-4/press-003'].spread_ratio: inf is not a finite number",
        ),
        (
            lambda h: h.drift["x" * 129].SetInParent(),
            "status.health.drift['" + "x" * 36 + "...]: 129 characters > 128",
        ),
        (
            lambda h: h.__setattr__("inference_latency_p99_ms", -math.inf),
            "status.health.inference_latency_p99_ms: -inf is not a finite number",
        ),
    ],
)
def test_a_bad_entry_is_named_wherever_it_is(spoil: object, named: str) -> None:
    status = _status(assets=8, skewed=8)
    spoil(status.health)  # type: ignore[operator]
    with pytest.raises(InvalidInput) as err:
        check_message(status, "status")
    assert str(err.value) == named
