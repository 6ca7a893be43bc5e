"""Folding one batch's edge alert events into alert rows, in memory: the store reads the
batch's open alerts in one query, folds every event here in sequence order, then writes the
changed rows at once (`sql_alerts.apply_alert_events`).

A raise opens an alert for its (device, asset, fault) group, or folds into the open one
(peak score, last seen, top sensors of the peak); a clear closes the open one.

A device has at most MAX_OPEN_ALERTS open alerts. A raise that would open one more does not:
it folds into the device's open-alert-limit alert instead (asset LIMIT_ASSET, fault
LIMIT_FAULT, opened by the first such raise, one per device while open), whose raise count
says how many were folded and whose note says why. The raise event itself is stored and
acknowledged like any other (`list_alert_events` shows it): nothing the device sent is lost,
only no alert of its own is opened. Once some of the device's alerts close, raises open
alerts again. A device raising thousands of distinct faults therefore costs one alert and one
delivery per batch, not one per fault: it cannot flood the operators' lists, the webhook
outbox, or the alert lock's holding time.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from cloud.domain import AlertEventRecord, AlertState
from cloud.store.tables import AlertRow

log = logging.getLogger(__name__)
MAX_OPEN_ALERTS = 256  # per device; a raise beyond it folds into the open-alert-limit alert
LIMIT_ASSET = "*"
LIMIT_FAULT = "open-alert-limit"
LIMIT_WARN_EVERY_S = 60.0
LIMIT_NAMES = 20  # of the groups not opened, the last this many are named on the alert


def open_key(device_id: str, asset: str, fault: str) -> str:
    return f"{device_id}/{asset}/{fault}"


def limit_key(device_id: str) -> str:
    """The open-alert-limit alert's open key: device ids hold no '#', so no group's key."""
    return f"{device_id}#{LIMIT_FAULT}"


class EventFold:
    """One batch's events folded into the alert rows they change, in sequence order."""

    def __init__(self, open_rows: Iterable[AlertRow], open_counts: dict[str, int]) -> None:
        self.open: dict[str, AlertRow] = {r.open_key: r for r in open_rows if r.open_key}
        self.counts = open_counts  # open alerts per device, the limit alert not counted
        self.changed: dict[str, AlertRow] = {}  # by id, in the order of their last change
        self.added: list[AlertRow] = []
        self.not_opened: dict[str, int] = {}  # raises folded into the limit alert, per device

    def apply(self, event: AlertEventRecord, now: dt.datetime) -> None:
        key = open_key(event.device_id, event.asset, event.fault)
        row = self.open.get(key)
        if event.kind != "raised":
            if row is None:
                return  # cleared, but an operator resolved it first
            _close(row, event)
            del self.open[key]
            self.counts[event.device_id] = self.counts.get(event.device_id, 1) - 1
        elif row is not None:
            _fold(row, event)
        elif self.counts.get(event.device_id, 0) < MAX_OPEN_ALERTS:
            row = self._add(_opened(event, key, event.asset, event.fault, []))
            self.counts[event.device_id] = self.counts.get(event.device_id, 0) + 1
        else:
            row = self._over_limit(event, now)
        self.changed.pop(row.id, None)
        self.changed[row.id] = row

    def _add(self, row: AlertRow) -> AlertRow:
        assert row.open_key is not None
        self.open[row.open_key] = row
        self.added.append(row)
        return row

    def _over_limit(self, event: AlertEventRecord, now: dt.datetime) -> AlertRow:
        self.not_opened[event.device_id] = self.not_opened.get(event.device_id, 0) + 1
        key = limit_key(event.device_id)
        row = self.open.get(key)
        if row is None:
            note = (
                f"this device has {MAX_OPEN_ALERTS} open alerts, the most allowed: a raise of "
                "a group with no open alert opens none and is counted here instead (its event "
                "is stored); close alerts of the device to have new ones open again"
            )
            notes = [[now.isoformat(), "control-plane", note]]
            row = self._add(_opened(event, key, LIMIT_ASSET, LIMIT_FAULT, notes))
        else:
            _fold(row, event)
        named = [n for n in row.doc.get("not_opened", []) if n != f"{event.asset}/{event.fault}"]
        row.doc = {**row.doc, "not_opened": [*named, f"{event.asset}/{event.fault}"][-LIMIT_NAMES:]}
        return row


def _opened(
    event: AlertEventRecord, key: str, asset: str, fault: str, notes: list[list[str]]
) -> AlertRow:
    return AlertRow(
        id=str(uuid.uuid4()),
        device_id=event.device_id,
        asset=asset,
        fault=fault,
        state=AlertState.FIRING.value,
        open_key=key,
        revision=0,  # one for the batch's changes is given out once they are known
        first_seen=event.raised_at,
        last_seen=event.window_end,
        resolved_at=None,
        doc={
            "peak_score": event.score,
            "top_sensors": [[n, v] for n, v in event.top_sensors],
            "notes": notes,
            "model_version": event.model_version,
            "raised_events": 1,
            "resolved_by": "",
            "edge_keys": [event.alert_key],
            "announced": False,
            "opening_score": event.score,
            "opening_model_version": event.model_version,
        },
    )


def _fold(row: AlertRow, event: AlertEventRecord) -> None:
    doc: dict[str, Any] = dict(row.doc)
    doc["raised_events"] = int(doc.get("raised_events", 0)) + 1
    if event.score > float(doc.get("peak_score", 0.0)):
        doc["peak_score"] = event.score
        doc["top_sensors"] = [[n, v] for n, v in event.top_sensors]
    if event.alert_key not in doc.get("edge_keys", []):
        doc["edge_keys"] = [*doc.get("edge_keys", []), event.alert_key][-20:]
    doc["model_version"] = event.model_version
    row.doc = doc
    row.last_seen = max(row.last_seen, event.window_end)


def _close(row: AlertRow, event: AlertEventRecord) -> None:
    # Cleared before anyone acknowledged it: returned to normal, unacknowledged.
    acked = row.state == AlertState.ACKNOWLEDGED.value
    row.state = (AlertState.RESOLVED if acked else AlertState.RETURNED).value
    row.open_key = None
    row.resolved_at = event.window_end
    row.last_seen = max(row.last_seen, event.window_end)
    row.doc = {**row.doc, "resolved_by": "edge"}


class LimitWarnings:
    """The log line for raises not opened as alerts: at most one every LIMIT_WARN_EVERY_S,
    counting those since the last."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -math.inf
        self._since: dict[str, int] = {}

    def add(self, not_opened: dict[str, int]) -> None:
        with self._lock:
            for device_id, n in not_opened.items():
                self._since[device_id] = self._since.get(device_id, 0) + n
            if not self._since or self._clock() - self._last < LIMIT_WARN_EVERY_S:
                return
            self._last = self._clock()
            counts, self._since = self._since, {}
        worst = sorted(counts.items(), key=lambda item: -item[1])
        named = ", ".join(f"{device_id} ({n})" for device_id, n in worst[:5])
        more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        log.warning(
            "%d raise(s) opened no alert: their devices have %d open alerts, the most allowed "
            "(each such raise is stored and counted on the device's '%s' alert): %s%s",
            sum(counts.values()), MAX_OPEN_ALERTS, LIMIT_FAULT, named, more,
        )  # fmt: skip
