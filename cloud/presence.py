"""Which devices are connected and what they last reported, written to the store in batches."""

from __future__ import annotations

import logging
import threading
from typing import Any

from cloud.clock import Clock, utc_now
from cloud.domain import PresenceUpdate
from cloud.store import Store

log = logging.getLogger(__name__)


class PresenceTracker:
    """Coalesces heartbeats per device; `flush` writes one transaction for all of them.

    Heartbeats arrive at fleet scale (thousands a second); writing each one would make the
    database the bottleneck. A device is shown online within one flush interval.
    """

    def __init__(self, store: Store, clock: Clock = utc_now) -> None:
        self.store = store
        self.clock = clock
        self._pending: dict[str, PresenceUpdate] = {}
        self._lock = threading.Lock()

    def seen(
        self,
        device_id: str,
        agent_version: str | None = None,
        status: dict[str, Any] | None = None,
        host: dict[str, Any] | None = None,
    ) -> None:
        """Notes a hello or heartbeat; fields left None keep their last value."""
        with self._lock:
            prev = self._pending.get(device_id)
            self._pending[device_id] = PresenceUpdate(
                device_id=device_id,
                last_seen=self.clock(),
                session_open=True,
                agent_version=agent_version if agent_version is not None else _keep(prev, "agent_version"),
                status=status if status is not None else _keep(prev, "status"),
                host=host if host is not None else _keep(prev, "host"),
            )

    def closed(self, device_id: str) -> None:
        """Notes that a device's session ended."""
        with self._lock:
            prev = self._pending.get(device_id)
            self._pending[device_id] = PresenceUpdate(
                device_id=device_id,
                last_seen=self.clock(),
                session_open=False,
                agent_version=_keep(prev, "agent_version"),
                status=_keep(prev, "status"),
                host=_keep(prev, "host"),
            )

    def flush(self) -> int:
        """Writes what accumulated; on failure the updates are kept for the next flush."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            self.store.record_presence(list(batch.values()))
        except Exception:
            with self._lock:
                for device_id, update in batch.items():
                    self._pending.setdefault(device_id, update)
            raise
        return len(batch)

    @property
    def pending(self) -> int:
        return len(self._pending)


def _keep(prev: PresenceUpdate | None, attr: str) -> Any:
    return getattr(prev, attr) if prev is not None else None

