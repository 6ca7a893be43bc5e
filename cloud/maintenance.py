"""Maintenance windows and out-of-service periods: while one covers a device's asset, its
alerts are stored, synced and kept current, but neither delivered (webhooks, PagerDuty,
Alertmanager) nor published on site (the agent gets the windows that cover it)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cloud.selectors import parse_selector
from edge_agent.errors import InvalidInput

MAX_REASON = 500
MAX_WINDOW = dt.timedelta(days=366)
_ASSET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True)
class MaintenanceWindow:
    id: str
    selector: str  # device labels
    asset: str  # "": every asset of a matching device
    starts_at: dt.datetime
    ends_at: dt.datetime | None  # None: out of service until removed
    reason: str
    created_by: str
    created_at: dt.datetime

    def active(self, now: dt.datetime) -> bool:
        return self.starts_at <= now and (self.ends_at is None or now < self.ends_at)

    def ended(self, now: dt.datetime) -> bool:
        return self.ends_at is not None and self.ends_at <= now

    def covers(self, labels: Mapping[str, str], asset: str, now: dt.datetime) -> bool:
        return (
            self.active(now)
            and (not self.asset or self.asset == asset)
            and parse_selector(self.selector).matches(labels)
        )

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        """Whether it names this device (now or later: what the device is sent)."""
        return parse_selector(self.selector).matches(labels)

    @property
    def label(self) -> str:
        return f"maintenance {self.id[:8]}"


def covering(
    windows: Sequence[MaintenanceWindow],
    labels: Mapping[str, str],
    asset: str,
    now: dt.datetime,
) -> MaintenanceWindow | None:
    return next((w for w in windows if w.covers(labels, asset, now)), None)


def check_window(
    selector: str,
    asset: str,
    starts_at: dt.datetime,
    ends_at: dt.datetime | None,
    reason: str,
    now: dt.datetime,
) -> None:
    """InvalidInput naming what is wrong with a window an operator asked for."""
    if not selector.strip():
        raise InvalidInput(
            "a maintenance window needs --selector (device labels, e.g. site=a,line=2); "
            "use --selector 'site' for every device with a site label"
        )
    if not parse_selector(selector).requirements:
        raise InvalidInput(f"--selector {selector!r} names no label: it would cover every device")
    if asset and not _ASSET.match(asset):
        raise InvalidInput(f"--asset {asset!r} is not an asset name (letters, digits, _.:-)")
    if not reason.strip():
        raise InvalidInput("a maintenance window needs --reason (shown with every suppression)")
    if len(reason) > MAX_REASON:
        raise InvalidInput(f"--reason holds at most {MAX_REASON} characters, got {len(reason)}")
    if ends_at is not None:
        if ends_at <= starts_at:
            raise InvalidInput(
                f"--to {ends_at.isoformat()} is not after --from {starts_at.isoformat()}"
            )
        if ends_at <= now:
            raise InvalidInput(f"--to {ends_at.isoformat()} has passed already")
        if ends_at - starts_at > MAX_WINDOW:
            raise InvalidInput(
                "a maintenance window lasts at most 366 days; leave out --to for an asset "
                "that is out of service until further notice"
            )
