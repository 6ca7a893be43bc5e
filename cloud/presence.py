"""Which devices are connected and what they last reported, written to the store in batches."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.clock import Clock, utc_now
from cloud.domain import PresenceUpdate
from cloud.store.base import DeviceStore

log = logging.getLogger(__name__)


def _as_dict(report: Any) -> dict[str, Any]:
    return dict(report)


@dataclass
class _Latest:
    """The newest report of one device, not yet encoded (encoding waits for the flush)."""

    last_seen: dt.datetime
    session_open: bool
    agent_version: str | None
    status: Any
    host: Any


class PresenceTracker:
    """Coalesces heartbeats per device; `flush` writes one transaction for all of them.

    Heartbeats arrive at fleet scale (thousands a second); writing each one would make the
    database the bottleneck. Reports are kept as given and turned into dicts by `encode`
    only at the flush, once per device instead of once per heartbeat. A device is shown
    online within one flush interval.
    """

    def __init__(
        self,
        store: DeviceStore,
        clock: Clock = utc_now,
        encode: Callable[[Any], dict[str, Any]] = _as_dict,
    ) -> None:
        self.store = store
        self.clock = clock
        self.encode = encode
        self._pending: dict[str, _Latest] = {}
        self._lock = threading.Lock()

    def seen(
        self,
        device_id: str,
        agent_version: str | None = None,
        status: Any = None,
        host: Any = None,
    ) -> None:
        """Notes a hello or heartbeat; fields left None keep their last unflushed value."""
        now = self.clock()
        with self._lock:
            prev = self._pending.get(device_id)
            if prev is None:
                self._pending[device_id] = _Latest(now, True, agent_version, status, host)
                return
            prev.last_seen, prev.session_open = now, True
            if agent_version is not None:
                prev.agent_version = agent_version
            if status is not None:
                prev.status = status
            if host is not None:
                prev.host = host

    def closed(self, device_id: str) -> None:
        """Notes that a device's session ended."""
        now = self.clock()
        with self._lock:
            prev = self._pending.setdefault(device_id, _Latest(now, False, None, None, None))
            prev.last_seen, prev.session_open = now, False

    def flush(self) -> int:
        """Writes what accumulated; on failure the updates are kept for the next flush."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        updates = [
            PresenceUpdate(
                device_id=device_id,
                last_seen=latest.last_seen,
                session_open=latest.session_open,
                agent_version=latest.agent_version,
                status=None if latest.status is None else self.encode(latest.status),
                host=None if latest.host is None else self.encode(latest.host),
            )
            for device_id, latest in batch.items()
        ]
        try:
            self.store.record_presence(updates)
        except Exception:
            if len(updates) > 1 and self._one_by_one(updates):
                return len(batch)
            with self._lock:  # the store is unavailable: keep them for the next flush
                for device_id, latest in batch.items():
                    self._pending.setdefault(device_id, latest)
            raise
        return len(batch)

    def _one_by_one(self, updates: list[PresenceUpdate]) -> bool:
        """After a grouped write failed: each update alone, so one bad row (a value the
        database refuses) never stops presence for the fleet. False when none could be
        written (the store is down); the bad ones are logged and dropped."""
        failed: list[tuple[str, Exception]] = []
        for update in updates:
            try:
                self.store.record_presence([update])
            except Exception as exc:  # noqa: BLE001 - judged below, logged
                failed.append((update.device_id, exc))
        if len(failed) == len(updates):
            return False
        for device_id, error in failed:
            log.error("presence of device %s dropped: the store refused it: %s", device_id, error)
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)
