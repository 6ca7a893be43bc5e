"""Maintenance periods this device was sent by the control plane, kept on disk so they hold
offline and across restarts. While one covers an asset, the agent still scores, stores and
syncs its alert events but does not publish a raise on site (the alert topic and the
retained state); a fault still open when the period ends is published then. A clear is
published when its raise was.

Read by the pipeline thread, replaced by the session's thread: the periods are one tuple,
swapped whole."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from edge_agent.files import UNREADABLE, replace_atomically
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
FILE = "maintenance.json"
MAX_PERIODS = 1000  # what one device keeps, whatever the control plane sends


@dataclass(frozen=True)
class Period:
    id: str
    asset: str  # "": every asset
    starts_at: float  # seconds since the epoch
    ends_at: float | None  # None: until removed (out of service)
    reason: str

    def covers(self, asset: str, at: float) -> bool:
        return (
            (not self.asset or self.asset == asset)
            and self.starts_at <= at
            and (self.ends_at is None or at < self.ends_at)
        )


class SiteMaintenance:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self.periods: tuple[Period, ...] = self._load()

    def _load(self) -> tuple[Period, ...]:
        try:
            doc = json.loads(self.path.read_text())
            return tuple(Period(**p) for p in doc["periods"][:MAX_PERIODS])
        except FileNotFoundError:
            return ()
        except UNREADABLE as exc:
            # Unreadable: publish everything (a missed alert is worse than one too many).
            log.error("maintenance periods in %s cannot be read (%s); none apply", self.path, exc)
            return ()

    def replace(self, message: agent_pb2.Maintenance) -> None:
        periods = tuple(
            Period(
                id=p.id[:64],
                asset=p.asset[:64],
                starts_at=p.starts_at.ToNanoseconds() / 1e9,
                ends_at=p.ends_at.ToNanoseconds() / 1e9 if p.HasField("ends_at") else None,
                reason=p.reason[:200],
            )
            for p in message.periods[:MAX_PERIODS]
        )
        if periods == self.periods:
            return
        self.periods = periods
        doc = {"periods": [p.__dict__ for p in periods]}
        try:
            replace_atomically(self.path, json.dumps(doc).encode(), 0o600)
        except OSError as exc:  # kept in memory; the next session sends them again
            log.error("maintenance periods cannot be saved to %s: %s", self.path, exc)
        log.info("maintenance: %d period(s) now apply to this device", len(periods))

    def covering(self, asset: str, at: float) -> Period | None:
        return next((p for p in self.periods if p.covers(asset, at)), None)
