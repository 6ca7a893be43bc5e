"""What one alert change looks like on the wire, per kind of delivery target.

- `standard`: Standard Webhooks (https://www.standardwebhooks.com): body
  `{"type": "alert.firing", "timestamp": ..., "data": {alert}}`, headers `webhook-id` (the
  same on every retry: receivers drop repeats by it), `webhook-timestamp`, and
  `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one signature per
  secret in use (two while a rotated secret overlaps). Verify with any Standard Webhooks
  library and the `whsec_...` secret.
- `pagerduty`: Events API v2; `dedup_key` is the alert id, firing triggers, an
  acknowledgement acknowledges, resolving (or the edge clearing it) resolves. The secret is
  the integration's routing key.
- `alertmanager`: `POST /api/v2/alerts` with the alert's labels (device, asset, site and the
  device's other labels, severity and model version of its opening raise: labels are the
  identity there) and annotations (score, top sensors, severity now);
  an open alert carries `endsAt` `hold_s` ahead and is sent again before then, a closed one
  its end.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from standardwebhooks.webhooks import Webhook

from cloud.severity import PAGERDUTY, SeverityRule, severity
from cloud.webhook_kinds import SECRET_PREFIX
from cloud.webhook_records import Delivery

PAGERDUTY_ACTION = {
    "firing": "trigger",
    "acknowledged": "acknowledge",
    "returned": "resolve",
    "resolved": "resolve",
}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$")
_OWN_LABELS = ("alertname", "alert_id", "device", "asset", "fault", "severity", "model_version")


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: `whsec_` secrets are base64; secrets from before Standard
    Webhooks are their UTF-8 bytes (the receiver's secret is then 'whsec_' + their base64)."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret[len(SECRET_PREFIX) :] + "==")
    return secret.encode()


def build(
    d: Delivery,
    secrets_in_use: Sequence[str],
    now: dt.datetime,
    rules: Sequence[SeverityRule] = (),
    hold_s: float = 900.0,
) -> Request:
    alert: dict[str, Any] = dict(d.payload["alert"])
    labels: dict[str, str] = dict(d.payload.get("device_labels", {}))
    alert["severity"] = severity(
        float(alert.get("peak_score", 0.0)), labels, str(alert.get("model_version", "")), rules
    )
    if d.kind == "pagerduty":
        return _pagerduty(d, alert, labels, secrets_in_use[0])
    if d.kind == "alertmanager":
        # Labels are an alert's identity in Alertmanager: their severity and model version
        # are the opening raise's, so a rising peak updates the alert instead of forking it.
        opening = severity(
            float(alert.get("opening_score", alert.get("peak_score", 0.0))),
            labels,
            str(alert.get("opening_model_version", alert.get("model_version", ""))),
            rules,
        )
        return _alertmanager(d, alert, labels, opening, secrets_in_use[0], now, hold_s)
    return _standard(d, alert, labels, secrets_in_use, now)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _standard(
    d: Delivery,
    alert: dict[str, Any],
    labels: dict[str, str],
    secrets_in_use: Sequence[str],
    now: dt.datetime,
) -> Request:
    body = _json(
        {
            "type": str(d.payload.get("event", "")),
            "timestamp": now.astimezone(dt.UTC).isoformat(),
            "data": {**alert, "device_labels": labels},
        }
    )
    message_id = f"dlv_{d.id}"
    text = body.decode()
    signatures = " ".join(
        Webhook(signing_key(secret)).sign(message_id, now, text) for secret in secrets_in_use
    )
    headers = {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
    }
    return Request(d.url, body, headers)


def _summary(alert: dict[str, Any]) -> str:
    return (
        f"{alert.get('fault', 'fault')} on {alert.get('device_name', '?')}/"
        f"{alert.get('asset', '?')}: score {float(alert.get('peak_score', 0.0)):.2f}"
    )[:1024]


def _sensors(alert: dict[str, Any]) -> str:
    return ", ".join(
        f"{s['sensor']} {float(s['contribution']):.2f}" for s in alert.get("top_sensors", [])[:5]
    )


def _pagerduty(
    d: Delivery, alert: dict[str, Any], labels: dict[str, str], routing_key: str
) -> Request:
    action = PAGERDUTY_ACTION.get(str(alert.get("state")), "trigger")
    doc: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": alert["id"],
    }
    if action == "trigger":
        doc["client"] = "Open-AutoGLM Edge"
        doc["payload"] = {
            "summary": _summary(alert),
            "source": f"{alert.get('device_name', '?')}/{alert.get('asset', '?')}",
            "severity": PAGERDUTY[alert["severity"]],
            "timestamp": alert.get("first_seen"),
            "component": alert.get("asset", ""),
            "group": labels.get("site", ""),
            "class": alert.get("fault", ""),
            "custom_details": {
                "peak_score": alert.get("peak_score"),
                "top_sensors": _sensors(alert),
                "model_version": alert.get("model_version", ""),
                "device_labels": labels,
            },
        }
    return Request(d.url, _json(doc), {"content-type": "application/json"})


def _alertmanager(
    d: Delivery,
    alert: dict[str, Any],
    device_labels: dict[str, str],
    opening_severity: str,
    token: str,
    now: dt.datetime,
    hold_s: float,
) -> Request:
    labels = {
        k: str(v)[:256]
        for k, v in device_labels.items()
        if _LABEL_NAME.match(k) and k not in _OWN_LABELS and not k.startswith("__")
    }
    labels.update(
        alertname="EquipmentFault",
        alert_id=str(alert["id"]),
        device=str(alert.get("device_name", "")),
        asset=str(alert.get("asset", "")),
        fault=str(alert.get("fault", "")),
        severity=opening_severity,
        model_version=str(alert.get("opening_model_version", alert.get("model_version", ""))),
    )
    state = str(alert.get("state", ""))
    if state in ("firing", "acknowledged"):
        ends = now + dt.timedelta(seconds=hold_s)
    else:
        ends = _time(alert.get("resolved_at")) or now
    annotations = {
        "summary": _summary(alert),
        "score": f"{float(alert.get('peak_score', 0.0)):.3f}",
        "top_sensors": _sensors(alert),
        "state": state,
        "severity_now": str(alert["severity"]),  # from the peak so far
        "model_version_now": str(alert.get("model_version", "")),
    }
    if alert.get("acknowledged_by"):
        annotations["acknowledged_by"] = str(alert["acknowledged_by"])
    body = _json(
        [
            {
                "labels": labels,
                "annotations": annotations,
                "startsAt": alert.get("first_seen"),
                "endsAt": ends.astimezone(dt.UTC).isoformat(),
            }
        ]
    )
    url = d.url.rstrip("/")
    if not url.endswith("/api/v2/alerts"):
        url += "/api/v2/alerts"
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return Request(url, body, headers)


def _time(value: Any) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) and value else None
