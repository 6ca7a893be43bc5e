"""How much one device may capture a day at the control plane: a count and a byte budget per
device and UTC day of the plane's clock, charged as captures arrive; a capture past it is
refused alone with the reason (the agent keeps it in its outbox's quarantine, never resends
it) and the rest of its batch is stored.

An agent keeps its own budget (`edge_agent.capture`: 16 MiB of encoded records a UTC day of
its clock by default, in an outbox of at most 256 MiB). The plane's is for a device that does
not keep one (a bug, a tampered agent): one streaming captures at 1.5 MiB/s grew the database
by 11.5 MiB/s. It stands far enough above a correctly configured agent that one is never
refused: 512 MiB a day takes a whole default outbox of captures synced after a long outage
and that day's own besides, and 100,000 captures a day are 12,500 alerts' windows (8 each).
Captures already stored (resent after a reconnect) are not charged again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cloud.captures import CaptureRecord

log = logging.getLogger(__name__)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class CaptureBudget:
    """What one device may have stored a UTC day: captures, and their bytes (`capture_bytes`)."""

    captures: int = 100_000
    bytes: int = 512 << 20


DAY_BUDGET = CaptureBudget()


@dataclass(frozen=True)
class CaptureUsage:
    """What a device's captures took of one day's budget."""

    day: int  # days since 1970-01-01, UTC
    captures: int = 0
    bytes: int = 0
    refused: int = 0


def utc_day(now: dt.datetime) -> int:
    return (now - _EPOCH).days


def capture_bytes(c: CaptureRecord) -> int:
    """About the capture's encoded size on the wire (what an agent's budget counts): its
    values and mask, 4 bytes a calibration number, its names, and a few bytes of framing."""
    texts = sum(len(s.encode()) + 2 for s in c.sensors)
    texts += len(c.asset.encode()) + len(c.model_version.encode()) + len(c.alert_key.encode())
    return len(c.values) + len(c.mask) + 4 * c.numbers() + texts + 64


def charge(
    device_id: str,
    usage: CaptureUsage,
    wanted: Sequence[tuple[int, int]],
    budget: CaptureBudget,
) -> tuple[CaptureUsage, dict[int, str]]:
    """Charges captures (sequence, bytes), in order, to the day's `usage`; the usage after,
    and the reasons of those refused by sequence. Each is judged alone: one too large for what
    is left is refused, a smaller one after it may still fit (as an agent's budget does)."""
    captures, size, refused = usage.captures, usage.bytes, {}
    for sequence, nbytes in wanted:
        if captures + 1 > budget.captures or size + nbytes > budget.bytes:
            refused[sequence] = (
                f"capture (sequence {sequence}, {nbytes:,} bytes): over this device's capture "
                f"budget at the control plane for {_date(usage.day)} UTC ({budget.captures:,} "
                f"captures or {budget.bytes:,} bytes a day; {captures:,} captures of "
                f"{size:,} bytes stored that day)"
            )
            continue
        captures += 1
        size += nbytes
    after = replace(usage, captures=captures, bytes=size, refused=usage.refused + len(refused))
    if refused and not usage.refused:  # once a device and day
        log.warning(
            "device %s: over its capture budget for %s UTC (%d captures, %d bytes a day); "
            "its further captures that day are refused (%d now)",
            device_id, _date(usage.day), budget.captures, budget.bytes, len(refused),
        )  # fmt: skip
    return after, refused


def _date(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=day)).date().isoformat()
