"""Maintenance periods down to the agents: each open session gets the windows that name its
device (active now or later), whenever they change: at once for changes made through this
replica, within `interval_s` for changes made through another or for relabelled devices."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence

from cloud.clock import Clock, utc_now
from cloud.maintenance import MaintenanceWindow
from cloud.outage_log import OutageLog
from cloud.selectors import parse_selector
from cloud.service.sessions import FLEET_SLICE, SessionHub
from cloud.store import Store
from edge_agent.errors import Unavailable
from edge_agent.waits import event_or_timeout
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)


def maintenance_message(
    windows: Sequence[MaintenanceWindow], labels: Mapping[str, str]
) -> agent_pb2.ControlMessage:
    periods = []
    for w in windows:
        if not w.applies_to(labels):
            continue
        period = agent_pb2.MaintenancePeriod(id=w.id, asset=w.asset, reason=w.reason[:200])
        period.starts_at.FromDatetime(w.starts_at)
        if w.ends_at is not None:
            period.ends_at.FromDatetime(w.ends_at)
        periods.append(period)
    return agent_pb2.ControlMessage(maintenance=agent_pb2.Maintenance(periods=periods))


class MaintenancePush:
    def __init__(
        self, store: Store, hub: SessionHub, interval_s: float = 5.0, clock: Clock = utc_now
    ) -> None:
        self.store = store
        self.hub = hub
        self.interval_s = interval_s
        self.clock = clock
        self._wake = asyncio.Event()
        # The windows in force as last read (monotonic time of the read, the windows) and
        # a count of the changes made through this process, which make a read stale.
        self._last_read: tuple[float, list[MaintenanceWindow]] | None = None
        self._changes = 0
        self._lock = threading.Lock()  # the event loop's changes against the readers' threads

    def changed(self) -> None:
        """Windows changed in this process (call on the event loop)."""
        with self._lock:
            self._changes += 1
            self._last_read = None
        self._wake.set()

    def windows_in_force(self) -> list[MaintenanceWindow]:
        """The windows in force, as read at most `interval_s` ago and after the last change
        made through this process (any thread). What a new session gets first: a fleet
        opening its sessions at once costs one read a period, not one each. A change made
        through another replica meanwhile reaches the session with the next refresh, within
        `interval_s`, as it reaches the sessions already open."""
        read = self._last_read
        if read is not None and time.monotonic() - read[0] < self.interval_s:
            return read[1]
        return self._load()

    def _load(self) -> list[MaintenanceWindow]:
        changes, at = self._changes, time.monotonic()
        windows = self.store.list_maintenance(self.clock(), include_ended=False)
        with self._lock:
            if changes == self._changes:  # a change made while reading: the read may miss it
                self._last_read = (at, windows)
        return windows

    async def run(self, stop: asyncio.Event) -> None:
        outage = OutageLog(log, "sending maintenance periods")
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.refresh()
            except Unavailable as exc:  # the database away: a line now and then
                outage.failed(exc, self.interval_s)
            except Exception:
                log.exception("sending maintenance periods failed")
            else:
                outage.worked()
            await event_or_timeout(self._wake, self.interval_s)

    async def refresh(self) -> int:
        """Sends each open session's periods where they changed; how many sessions got them.

        One message is built per distinct set of periods (with none in force, one for the
        whole fleet), and the event loop gets a turn every `FLEET_SLICE` devices: at 10,000
        sessions, a message built per device held the loop for 90 ms every period, and every
        heartbeat ack on the replica waited behind it."""
        device_ids = self.hub.device_ids()
        if not device_ids:
            return 0
        windows, labels = await asyncio.to_thread(self._read, device_ids)
        selectors = [(w.id, parse_selector(w.selector)) for w in windows]
        built: dict[tuple[str, ...], tuple[agent_pb2.ControlMessage, bytes]] = {}
        sent = 0
        for i, device_id in enumerate(device_ids):
            if i and i % FLEET_SLICE == 0:
                await asyncio.sleep(0)
            device_labels = labels.get(device_id, {})
            key = tuple(w for w, selector in selectors if selector.matches(device_labels))
            if key not in built:
                message = maintenance_message(windows, device_labels)
                built[key] = (message, message.SerializeToString(deterministic=True))
            sent += self.hub.send_maintenance(device_id, *built[key])
        return sent

    def _read(
        self, device_ids: list[str]
    ) -> tuple[list[MaintenanceWindow], dict[str, dict[str, str]]]:
        windows = self._load()
        if not windows:
            return [], {}
        wanted = set(device_ids)
        devices = self.store.device_summaries()
        return windows, {d.id: d.labels for d in devices if d.id in wanted}
