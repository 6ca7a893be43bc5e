"""Domain types of the control plane: plain dataclasses, never protobuf messages."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edge_agent.errors import InvalidInput


class DeviceState(enum.StrEnum):
    """Where a device is in its lifecycle."""

    PENDING = "pending"  # registered, token issued, not yet enrolled
    ACTIVE = "active"  # holds a certificate
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the store keeps it."""

    id: str
    name: str
    labels: dict[str, str]
    profile: str
    state: DeviceState
    created_at: dt.datetime
    enrolled_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    revoked_reason: str = ""
    cert_serial: str = ""
    cert_fingerprint: str = ""
    cert_not_after: dt.datetime | None = None
    previous_fingerprint: str = ""  # renewed from; accepted until previous_valid_until
    previous_valid_until: dt.datetime | None = None
    last_seen: dt.datetime | None = None
    session_open: bool = False
    agent_version: str = ""
    status: dict[str, Any] = field(default_factory=dict)  # last AgentStatus, as a dict
    host: dict[str, Any] = field(default_factory=dict)  # last HostFacts, as a dict

    def accepts(self, fingerprint: str, now: dt.datetime) -> bool:
        """Whether a client certificate with `fingerprint` may act for this device now: the
        current one, or the one it renewed from during the renewal's grace period."""
        if not fingerprint:
            return False
        if fingerprint == self.cert_fingerprint:
            return True
        return (
            fingerprint == self.previous_fingerprint
            and self.previous_valid_until is not None
            and now < self.previous_valid_until
        )

    def is_online(self, now: dt.datetime, offline_after: dt.timedelta) -> bool:
        return is_online(self.state, self.session_open, self.last_seen, now, offline_after)


def is_online(
    state: DeviceState,
    session_open: bool,
    last_seen: dt.datetime | None,
    now: dt.datetime,
    offline_after: dt.timedelta,
) -> bool:
    """An active device with a live session, heard from within `offline_after`."""
    return (
        state is DeviceState.ACTIVE
        and session_open
        and last_seen is not None
        and now - last_seen <= offline_after
    )


class DeviceSummary(NamedTuple):
    """What the plane's periodic fleet-wide reads (metrics, maintenance periods) need of
    every device: a few columns, not the whole record (at 10,000 devices the whole records
    cost most of a CPU-second a read). A named tuple, not a dataclass: one is built per
    device per read."""

    id: str
    name: str
    labels: dict[str, str]
    state: DeviceState
    session_open: bool
    last_seen: dt.datetime | None
    cert_not_after: dt.datetime | None
    health: dict[str, Any]  # the last status's `health`, as a dict

    def is_online(self, now: dt.datetime, offline_after: dt.timedelta) -> bool:
        return is_online(self.state, self.session_open, self.last_seen, now, offline_after)


@dataclass(frozen=True)
class OperatorRecord:
    """An operator credential (its token is stored only as a hash)."""

    id: str
    name: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None
    role: str = "admin"


@dataclass(frozen=True)
class AuditEntry:
    """One mutating operator call, as the audit log keeps it."""

    at: dt.datetime
    operator: str
    role: str
    method: str
    target: str
    code: str  # a gRPC status code name
    detail: str = ""
    id: int = 0


@dataclass(frozen=True)
class PresenceUpdate:
    """What a session learned about a device since the last flush."""

    device_id: str
    last_seen: dt.datetime
    session_open: bool
    agent_version: str | None = None
    status: dict[str, Any] | None = None
    host: dict[str, Any] | None = None


LABEL_KEY_MAX = 63
LABEL_VALUE_MAX = 255


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Label keys are short identifiers; values are short text without separators."""
    for key, value in labels.items():
        if not key or len(key) > LABEL_KEY_MAX or not all(c.isalnum() or c in "-_./" for c in key):
            raise InvalidInput(
                f"label key '{key}' must be 1-{LABEL_KEY_MAX} letters, digits or -_./"
            )
        if len(value) > LABEL_VALUE_MAX or any(c in ",=\n" for c in value):
            raise InvalidInput(f"label '{key}' has a value with ',', '=' or a newline, or too long")
    return dict(labels)


@dataclass(frozen=True)
class EnrollmentGroup:
    """A token that enrolls up to `max_uses` devices, each naming itself (factory images):
    each becomes a device with these labels (`{name}` in a value: the device's name) and
    profile, active at once."""

    name: str
    labels: Mapping[str, str]
    profile: str
    max_uses: int
    uses: int
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None

    def labels_for(self, device_name: str) -> dict[str, str]:
        named = {k: v.replace("{name}", device_name) for k, v in self.labels.items()}
        return validate_labels(named)


# A prediction as the sync path hands it to the store, checked, in plain values built
# straight from the wire (no Python object per record): (device id, sequence, asset, window
# start seconds since the epoch, its microseconds, window end seconds, its microseconds,
# score, anomalous, model version, contributions as JSON text of an object).
PredictionRow = tuple[str, int, str, int, int, int, int, float, bool, str, str]


@dataclass(frozen=True)
class PredictionRecord:
    """One scored window a device synced (stored once per device and sequence)."""

    device_id: str
    sequence: int
    asset: str
    window_start: dt.datetime
    window_end: dt.datetime
    score: float
    anomalous: bool
    model_version: str
    contributions: dict[str, float]


@dataclass(frozen=True)
class AlertEventRecord:
    """An alert raised or cleared on a device (stored once per device and sequence)."""

    device_id: str
    sequence: int
    alert_key: str
    kind: str  # "raised" | "cleared"
    asset: str
    fault: str
    score: float
    top_sensors: list[tuple[str, float]]
    window_start: dt.datetime
    window_end: dt.datetime
    raised_at: dt.datetime
    model_version: str


@dataclass(frozen=True)
class StoredCount:
    """What one batch of synced records did to the store."""

    stored: int
    duplicates: int
    last_sequence: int
    alerts_changed: int = 0  # alerts opened, updated or resolved by its edge events
    # Captures past the device's daily budget, not stored: the reason by sequence.
    refused: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecord:
    """A bundle pushed to the control plane; its files are in the artifact store."""

    name: str
    version: str
    manifest_digest: str  # "sha256:<hex>" of manifest.json
    signature_digest: str  # of manifest.sig
    size_bytes: int
    pushed_at: dt.datetime
    manifest: dict[str, Any]  # the manifest, parsed


@dataclass(frozen=True)
class DesiredModel:
    """The model version the control plane wants on one device."""

    device_id: str
    model_name: str
    model_version: str
    manifest_digest: str
    signature_digest: str
    rollout_id: str
    shadow: bool  # run beside the incumbent and report; do not serve
    updated_at: dt.datetime
    revert_version: str = ""  # an aborted rollout's version (see DesiredState)
    revision: int = 0  # set by the store: the change feed's position of this desired state


class InstallOutcome(enum.StrEnum):
    """What a device says about installing a version (the wire's InstallReport.Outcome)."""

    INSTALLED = "installed"
    DOWNLOAD_FAILED = "download_failed"
    VERIFY_FAILED = "verify_failed"
    SELF_TEST_FAILED = "self_test_failed"
    START_FAILED_ROLLED_BACK = "start_failed_rolled_back"
    UNKNOWN = "unknown"  # unspecified, or a kind this control plane does not know yet


@dataclass(frozen=True)
class InstallReport:
    """A device's report on installing a rollout's version."""

    rollout_id: str
    model_version: str
    outcome: InstallOutcome
    detail: str = ""
    backend: str = ""
    serving_name: str = ""  # what the device served when it applied the desired state
    serving_version: str = ""
    # Not the model's failure: the device's disk did not take it and the agent tries again.
    retrying: bool = False


@dataclass(frozen=True)
class ShadowReport:
    """A device's comparison of a shadow candidate with its incumbent on the same windows."""

    rollout_id: str
    candidate_version: str
    windows: int
    agreement: float
    alert_rate_candidate: float
    alert_rate_incumbent: float
    latency_p99_ms: float
    incumbent_latency_p99_ms: float
    detail: str = ""
    # The incumbent against itself recalibrated on other rows (0: not measured).
    self_agreement: float = 0.0
    self_rate_difference: float = 0.0
    latency_p50_ms: float = 0.0
    incumbent_latency_p50_ms: float = 0.0
    latency_samples: int = 0  # timed batches of the side timed less often (0: not sent)


LATENCY_TAIL_SAMPLES = 100  # timed batches a side needs before its p99 is judged


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    PARTIAL = "partial"  # every wave went through, some devices failed

    @property
    def active(self) -> bool:
        return self in (RolloutState.RUNNING, RolloutState.PAUSED)


class TargetState(enum.StrEnum):
    """Where one device is in a rollout."""

    WAITING = "waiting"  # its wave has not started
    INSTALLING = "installing"  # desired state sent, no report yet
    SHADOWING = "shadowing"  # installed beside the incumbent, soaking
    UPDATED = "updated"  # serving the new version
    FAILED = "failed"  # install, self-test or gate failure on this device
    DEFERRED = "deferred"  # offline when its wave ran; installs when it returns
    ROLLED_BACK = "rolled_back"  # sent back to its previous version by an abort


@dataclass(frozen=True)
class Wave:
    index: int
    size: str  # "1" (devices) or "10%"
    target: int  # devices in this wave (not cumulative)
    started_at: dt.datetime | None = None
    installed_at: dt.datetime | None = None  # every online device of the wave reported
    soak_until: dt.datetime | None = None
    promoted_at: dt.datetime | None = None


@dataclass(frozen=True)
class Gates:
    max_failure_fraction: float = 0.05
    min_shadow_agreement: float = 0.9
    max_alert_rate_difference: float = 0.1
    max_latency_regression: float = 2.0
    min_shadow_windows: int = 20
    max_agent_errors: int = 10  # errors an agent may add during the soak


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    model_name: str
    model_version: str
    selector: str
    state: RolloutState
    waves: tuple[Wave, ...]
    current_wave: int
    soak_s: float
    gates: Gates
    reason: str
    created_at: dt.datetime
    updated_at: dt.datetime
    revision: int = 0  # the stored revision this record was read at (compare-and-set)


@dataclass(frozen=True)
class RolloutTarget:
    """One device of a rollout."""

    rollout_id: str
    device_id: str
    wave: int
    state: TargetState
    detail: str = ""
    previous_version: str = ""
    previous_name: str = ""
    errors_at_install: int = -1  # the agent's error counter when it reported the install
    shadow: dict[str, Any] = field(default_factory=dict)  # latest ShadowReport, as a dict
    updated_at: dt.datetime | None = None
    revision: int = 0  # the stored revision this record was read at (compare-and-set)

    @property
    def shadow_windows(self) -> int:
        return int(self.shadow.get("windows", 0))

    @property
    def shadow_agreement(self) -> float:
        return float(self.shadow.get("agreement", 0.0))

    @property
    def shadow_self_agreement(self) -> float:
        """The incumbent's agreement with itself recalibrated (0: not measured)."""
        return float(self.shadow.get("self_agreement", 0.0))

    @property
    def shadow_self_rate_difference(self) -> float:
        return float(self.shadow.get("self_rate_difference", 0.0))

    @property
    def shadow_alert_rate_difference(self) -> float:
        return abs(
            float(self.shadow.get("alert_rate_candidate", 0.0))
            - float(self.shadow.get("alert_rate_incumbent", 0.0))
        )

    @property
    def shadow_latency_ms(self) -> tuple[float, float, str]:
        """Per window, measured in the same run: (candidate, incumbent, statistic). The p99
        where each side was timed often enough for a tail (`LATENCY_TAIL_SAMPLES`), else the
        medians: on a few dozen batches a p99 is one hiccup of a busy machine. Reports from
        agents that send no sample count are judged on their p99."""
        s = self.shadow
        samples = int(s.get("latency_samples", 0))
        if 0 < samples < LATENCY_TAIL_SAMPLES and float(s.get("incumbent_latency_p50_ms", 0)):
            return (
                float(s.get("latency_p50_ms", 0.0)),
                float(s.get("incumbent_latency_p50_ms", 0.0)),
                "p50",
            )
        return (
            float(s.get("latency_p99_ms", 0.0)),
            float(s.get("incumbent_latency_p99_ms", 0.0)),
            "p99",
        )

    @property
    def latency_ratio(self) -> float:
        """Candidate over incumbent latency, as the gate judges it; 0 when not measured."""
        candidate, incumbent, _ = self.shadow_latency_ms
        return candidate / incumbent if incumbent > 0 else 0.0


class AlertState(enum.StrEnum):
    FIRING = "firing"  # raised on the edge, nobody has acknowledged it
    ACKNOWLEDGED = "acknowledged"  # someone is on it; the edge may still be raising
    RESOLVED = "resolved"  # resolved by an operator, or cleared by the edge after an ack
    # Cleared by the edge before anyone acknowledged it (ISA-18.2 "return to normal,
    # unacknowledged"): still wants an acknowledgement, which closes it.
    RETURNED = "returned"

    @property
    def active(self) -> bool:
        """The condition still holds on the edge (as far as the cloud knows)."""
        return self in (AlertState.FIRING, AlertState.ACKNOWLEDGED)


VERDICTS = ("true", "false", "unsure")


@dataclass(frozen=True)
class AlertNote:
    at: dt.datetime
    by: str  # operator name, or "edge"
    text: str


@dataclass(frozen=True)
class AlertRecord:
    """One fault episode of one asset: edge raise/clear events grouped by device, asset and
    fault, with the operator's lifecycle on top. `revision` grows with every change (the
    cursor of watch streams and webhook deliveries)."""

    id: str
    device_id: str
    asset: str
    fault: str
    state: AlertState
    peak_score: float
    top_sensors: tuple[tuple[str, float], ...]
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None
    resolved_by: str  # "edge", an operator's name, or "" while open
    notes: tuple[AlertNote, ...]
    model_version: str
    raised_events: int  # edge raise events folded into this alert
    revision: int
    verdict: str = ""  # "" or one of VERDICTS: the operator's call
    fault_type: str = ""  # what the operator found
    acknowledged_by: str = ""
    shelved_until: dt.datetime | None = None
    shelved_by: str = ""
    shelve_reason: str = ""
    suppressed_by: str = ""  # "shelved", "maintenance <id>": its changes are not delivered
    opening_score: float = 0.0  # the first raise's score and model: Alertmanager's identity
    opening_model_version: str = ""

    def to_json(self, device_name: str) -> dict[str, Any]:
        """The alert as webhook payloads and `--json` outputs carry it."""

        def iso(value: dt.datetime | None) -> str | None:
            return value.astimezone(dt.UTC).isoformat() if value is not None else None

        return {
            "id": self.id,
            "device_id": self.device_id,
            "device_name": device_name,
            "asset": self.asset,
            "fault": self.fault,
            "state": self.state.value,
            "peak_score": self.peak_score,
            "top_sensors": [{"sensor": n, "contribution": v} for n, v in self.top_sensors],
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "resolved_at": iso(self.resolved_at),
            "resolved_by": self.resolved_by,
            "notes": [{"at": iso(n.at), "by": n.by, "text": n.text} for n in self.notes],
            "model_version": self.model_version,
            "raised_events": self.raised_events,
            "revision": self.revision,
            "verdict": self.verdict,
            "fault_type": self.fault_type,
            "acknowledged_by": self.acknowledged_by,
            "shelved_until": iso(self.shelved_until),
            "shelve_reason": self.shelve_reason,
            "suppressed_by": self.suppressed_by,
            "opening_score": self.opening_score,
            "opening_model_version": self.opening_model_version,
        }


@dataclass(frozen=True)
class AlertFilter:
    state: AlertState | None = None
    device_id: str = ""
    since: dt.datetime | None = None  # last seen at or after
    verdict: str | None = None  # None: any; "": not given yet; else one of VERDICTS

    def matches(self, alert: AlertRecord) -> bool:
        return (
            (self.state is None or alert.state is self.state)
            and (not self.device_id or alert.device_id == self.device_id)
            and (self.since is None or alert.last_seen >= self.since)
            and (self.verdict is None or alert.verdict == self.verdict)
        )


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str  # replica id
    expires_at: dt.datetime
    acquired_at: dt.datetime

    def held_by(self, holder: str, now: dt.datetime) -> bool:
        return self.holder == holder and self.expires_at > now
