"""Domain types of webhooks: the filter an operator sets on one, the webhook as stored and
one alert change queued for delivery to it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cloud.domain import AlertRecord, AlertState
from edge_agent.errors import InvalidInput


@dataclass(frozen=True)
class WebhookFilter:
    """Which alert changes a webhook receives; `parse` reads "state=firing,device=edge-1,
    asset=pump-1,fault=anomaly,min_score=1.5" (every key optional, values exact)."""

    states: tuple[str, ...] = ()
    device: str = ""  # device name
    asset: str = ""
    fault: str = ""
    min_score: float = 0.0

    KEYS = ("state", "device", "asset", "fault", "min_score")

    @staticmethod
    def parse(text: str) -> WebhookFilter:
        fields: dict[str, Any] = {}
        for item in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise InvalidInput(f"webhook filter: {item!r} is not key=value")
            if key not in WebhookFilter.KEYS:
                raise InvalidInput(
                    f"webhook filter: unknown key {key!r} (use {', '.join(WebhookFilter.KEYS)})"
                )
            if key == "state":
                states = tuple(v.strip() for v in value.split("|"))
                unknown = [v for v in states if v not in {s.value for s in AlertState}]
                if unknown:
                    raise InvalidInput(
                        f"webhook filter: state {unknown[0]!r} is not firing, acknowledged, "
                        "returned or resolved (several: state=firing|resolved)"
                    )
                fields["states"] = states
            elif key == "min_score":
                try:
                    fields["min_score"] = float(value)
                except ValueError:
                    raise InvalidInput(
                        f"webhook filter: min_score {value!r} is not a number"
                    ) from None
            else:
                fields[key] = value
        return WebhookFilter(**fields)

    def matches(self, alert: AlertRecord, device_name: str) -> bool:
        return (
            (not self.states or alert.state.value in self.states)
            and (not self.device or self.device == device_name)
            and (not self.asset or self.asset == alert.asset)
            and (not self.fault or self.fault == alert.fault)
            and alert.peak_score >= self.min_score
        )


@dataclass(frozen=True)
class WebhookRecord:
    id: str
    url: str
    secret: str
    filter: str
    created_at: dt.datetime
    delivered: int = 0
    pending: int = 0
    dead: int = 0
    last_error: str = ""
    kind: str = "standard"  # standard | pagerduty | alertmanager
    previous_secret: str = ""  # signs beside `secret` until `previous_until` (rotation)
    previous_until: dt.datetime | None = None


@dataclass(frozen=True)
class Delivery:
    """One alert change to POST to one webhook (the transactional outbox's row)."""

    id: int
    webhook_id: str
    url: str
    secret: str
    alert_id: str
    revision: int
    payload: dict[str, Any]
    attempts: int
    kind: str = "standard"
    previous_secret: str = ""
    previous_until: dt.datetime | None = None
    created_at: dt.datetime | None = None  # queued (or queued again, for a repeat)
    leased_until: dt.datetime | None = None  # its claim's lease: names the claim to release
