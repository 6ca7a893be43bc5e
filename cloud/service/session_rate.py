"""How often one device may open sessions: at most SESSIONS_PER_WINDOW in SESSION_WINDOW_S;
more are refused with RESOURCE_EXHAUSTED and the time until the oldest leaves the window.

The flapping check (`cloud.session_claims`) counts replacements only: a device that closes
each session before opening the next is never counted there. One did 71 sessions a second,
all accepted, each a claim written to the store and two lines logged, 0.84 of the plane's
core. An agent opens a session when it starts, after a network drop or a plane restart, and
after renewing its certificate: a few an hour.

Counted in memory, per process: a refusal costs no query and is not logged one by one (at
most once per REFUSAL_LOG_S per device). A device spread over R replicas (or `--workers`
processes) may open R times as many; the store's row of the device's claim could count them
fleet-wide, at the price of a query per refusal. A refused attempt is not counted: the hint
is when the device may come back, whatever it did meanwhile. Nor is a session the plane
itself ended for want of its store (`refund`): an agent reconnects a second after such an
end, and a store failing each batch must not get the device refused as "too often"."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from edge_agent.errors import RateLimited

log = logging.getLogger(__name__)

SESSIONS_PER_WINDOW = 10
SESSION_WINDOW_S = 60.0
REFUSAL_LOG_S = 60.0
MIN_HINT_S = 1.0


class SessionRate:
    """Sessions opened per device in the last `window_s` (event loop only)."""

    def __init__(
        self,
        limit: int = SESSIONS_PER_WINDOW,
        window_s: float = SESSION_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._opened: dict[str, deque[float]] = {}
        self._unlogged: dict[str, int] = {}  # refusals since the device's last log line
        self._logged_at: dict[str, float] = {}
        self._swept_at = clock()
        self.refused = Counter(
            "autoglm_sessions_refused_too_often",
            f"Sessions refused: the device opened {limit} in the last {window_s:.0f} s.",
            registry=registry,
        )

    def take(self, device_id: str) -> None:
        """Counts a session `device_id` opens now; RateLimited when it opened `limit` in the
        window (not counted)."""
        now = self.clock()
        if now - self._swept_at >= self.window_s:
            self._sweep(now)
        opened = self._opened.setdefault(device_id, deque())
        while opened and now - opened[0] >= self.window_s:
            opened.popleft()
        if len(opened) < self.limit:
            opened.append(now)
            return
        self.refused.inc()
        hint = max(MIN_HINT_S, opened[0] + self.window_s - now)
        self._log_refusal(device_id, now)
        raise RateLimited(
            f"device {device_id} opened {len(opened)} sessions in the last "
            f"{self.window_s:.0f} s, the most one device may (the control plane is not busy: "
            f"this device reconnects too often); try again in {hint:.0f} s",
            retry_after_s=hint,
        )

    def refund(self, device_id: str) -> None:
        """Uncounts the session `device_id` opened last: the plane ended it (or refused it
        after counting) for a failure of its own, not the device's reconnecting."""
        opened = self._opened.get(device_id)
        if opened:
            opened.pop()

    def _log_refusal(self, device_id: str, now: float) -> None:
        refused = self._unlogged.get(device_id, 0) + 1
        if now - self._logged_at.get(device_id, now - REFUSAL_LOG_S) < REFUSAL_LOG_S:
            self._unlogged[device_id] = refused
            return
        self._unlogged.pop(device_id, None)
        self._logged_at[device_id] = now
        log.warning(
            "device %s opens sessions too often (over %d in %.0f s): %d refused since the last "
            "line about it",
            device_id, self.limit, self.window_s, refused,
        )  # fmt: skip

    def _sweep(self, now: float) -> None:
        """Forgets the devices with nothing in the window (memory stays bounded by the devices
        that opened a session lately)."""
        self._swept_at = now
        for device_id in [
            d for d, t in self._opened.items() if not t or now - t[-1] >= self.window_s
        ]:
            del self._opened[device_id]
        for device_id in [d for d, t in self._logged_at.items() if now - t >= REFUSAL_LOG_S]:
            del self._logged_at[device_id]
            if refused := self._unlogged.pop(device_id, 0):
                log.warning(
                    "device %s opened sessions too often: %d more refused", device_id, refused
                )
