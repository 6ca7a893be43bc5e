"""Domain types of the control plane: plain dataclasses, never protobuf messages."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    last_seen: dt.datetime | None = None
    session_open: bool = False
    agent_version: str = ""
    status: dict[str, Any] = field(default_factory=dict)  # last AgentStatus, as a dict
    host: dict[str, Any] = field(default_factory=dict)  # last HostFacts, as a dict

    def is_online(self, now: dt.datetime, offline_after: dt.timedelta) -> bool:
        return (
            self.state is DeviceState.ACTIVE
            and self.session_open
            and self.last_seen is not None
            and now - self.last_seen <= offline_after
        )


@dataclass(frozen=True)
class OperatorRecord:
    """An operator credential (its token is stored only as a hash)."""

    id: str
    name: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None


@dataclass(frozen=True)
class PresenceUpdate:
    """What a session learned about a device since the last flush."""

    device_id: str
    last_seen: dt.datetime
    session_open: bool
    agent_version: str | None = None
    status: dict[str, Any] | None = None
    host: dict[str, Any] | None = None


def parse_selector(text: str) -> dict[str, str]:
    """Parses 'k=v,k2=v2' into a mapping; empty text selects everything."""
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"selector part '{part}' is not of the form key=value")
        selector[key.strip()] = value.strip()
    return selector


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


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


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
