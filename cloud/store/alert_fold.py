"""Folding one batch's edge alert events into alert rows, in memory: the store reads the
batch's open alerts in one query, folds every event here in sequence order, then writes the
changed rows at once (`sql_alerts.apply_alert_events`).

A raise opens an alert for its (device, asset, fault) group, or folds into the open one
(peak score, last seen, top sensors of the peak); a clear closes the open one.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from cloud.domain import AlertEventRecord, AlertState
from cloud.store.tables import AlertRow


def open_key(device_id: str, asset: str, fault: str) -> str:
    return f"{device_id}/{asset}/{fault}"


class EventFold:
    """One batch's events folded into the alert rows they change, in sequence order."""

    def __init__(self, open_rows: Iterable[AlertRow]) -> None:
        self.open: dict[str, AlertRow] = {r.open_key: r for r in open_rows if r.open_key}
        self.changed: dict[str, AlertRow] = {}  # by id, in the order of their last change
        self.added: list[AlertRow] = []

    def apply(self, event: AlertEventRecord, now: dt.datetime) -> None:
        key = open_key(event.device_id, event.asset, event.fault)
        row = self.open.get(key)
        if event.kind != "raised":
            if row is None:
                return  # cleared, but an operator resolved it first
            _close(row, event)
            del self.open[key]
        elif row is not None:
            _fold(row, event)
        else:
            row = self._add(_opened(event, key, event.asset, event.fault, []))
        self.changed.pop(row.id, None)
        self.changed[row.id] = row

    def _add(self, row: AlertRow) -> AlertRow:
        assert row.open_key is not None
        self.open[row.open_key] = row
        self.added.append(row)
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
