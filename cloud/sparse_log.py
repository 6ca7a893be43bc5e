"""Log lines that a device's messages cause, at most one a period per device and reason: a
device repeating a bad report (thousands a second, each a line) cannot flood the control
plane's log. The next line of the same device and reason says how many were left out; a
count left pending (no later line of that pair) is said when the pair is swept: the first
line of any pair logged once `every_s` has passed since the last sweep sweeps the pairs idle
that long (and a full table sweeps too). There is no timer: with nothing logged at all, a
pending count waits for the next line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

SPARSE_LOG_S = 60.0
MAX_KEYS = 10_000  # (device, reason) pairs remembered; swept of idle ones past this


class SparseLog:
    """Lines to `log`, one per `every_s` per (device, reason) at most (any thread)."""

    def __init__(
        self,
        log: logging.Logger,
        every_s: float = SPARSE_LOG_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.log = log
        self.every_s = every_s
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        # (device, reason) -> [when its last line was logged, lines left out since]
        self._keys: dict[tuple[str, str], list[float | int]] = {}
        self._swept_at = clock()

    def warning(self, device: str, reason: str, msg: str, *args: Any, **kwargs: Any) -> None:
        self.emit(logging.WARNING, device, reason, msg, *args, **kwargs)

    def info(self, device: str, reason: str, msg: str, *args: Any, **kwargs: Any) -> None:
        self.emit(logging.INFO, device, reason, msg, *args, **kwargs)

    def emit(
        self, level: int, device: str, reason: str, msg: str, *args: Any, **kwargs: Any
    ) -> None:
        """Logs `msg % args` unless a line of `device` and `reason` was logged less than
        `every_s` ago (then it is only counted)."""
        if not self.log.isEnabledFor(level):
            return
        now = self.clock()
        with self._lock:
            entry = self._keys.get((device, reason))
            if entry is not None and now - entry[0] < self.every_s:
                entry[1] += 1
                return
            left_out = int(entry[1]) if entry is not None else 0
            full = entry is None and len(self._keys) >= self.max_keys
            due = now - self._swept_at >= self.every_s
            swept = self._sweep(now, full) if full or due else []
            self._keys[(device, reason)] = [now, 0]
        for (other, why), count in swept:
            self.log.log(level, "device %s: %d more %r line(s) not logged", other, count, why)
        if left_out:
            msg += " (%d more like it from this device not logged in the last %.0f s)"
            args = (*args, left_out, self.every_s)
        self.log.log(level, msg, *args, **kwargs)

    def _sweep(self, now: float, full: bool) -> list[tuple[tuple[str, str], int]]:
        """Forgets the pairs with no line for `every_s` (when `full`, all of them if none is
        that old): the counts some of them still held, to be logged."""
        self._swept_at = now
        idle = [k for k, (at, _) in self._keys.items() if now - at >= self.every_s]
        pending = [(k, int(self._keys[k][1])) for k in idle or (list(self._keys) if full else [])]
        for key, _ in pending:
            del self._keys[key]
        return [(k, n) for k, n in pending if n]
