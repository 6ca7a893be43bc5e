"""What an agent's outbox handed out against what the control plane stored: equal lists mean
every record arrived exactly once."""

from __future__ import annotations

import datetime as dt

from cloud.captures import CaptureFilter
from cloud.store.base import Store
from edge_agent.outbox import Outbox


def stored_sequences(store: Store, device_id: str) -> list[int]:
    """Every record sequence of the device the control plane stored, captures included."""
    predictions = store.list_predictions(device_id, limit=1_000_000)
    alerts = store.list_alert_events(device_id, limit=1_000_000)
    captures = store.list_captures(
        CaptureFilter(dt.datetime(1970, 1, 1, tzinfo=dt.UTC), (device_id,)), limit=1_000_000
    )
    return sorted(
        [p.sequence for p in predictions]
        + [a.sequence for a in alerts]
        + [c.sequence for c in captures]
    )


def box_sequences(box: Outbox) -> list[int]:
    """Every sequence number the agent's outbox has handed out so far."""
    return list(range(1, box.stats().next_sequence))
