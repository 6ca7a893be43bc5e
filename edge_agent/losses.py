"""Where records were lost: the stretches of time in which the outbox could not be written
(disk full), and the windows an agent killed (kill -9, power loss) never scored, with how
many records each lost, for the heartbeat ("lost N predictions between t1 and t2") and
`autoglm device show`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace

KEPT = 20  # closed stretches remembered
DISK_FULL = "outbox_write_failed"
UNCLEAN_STOP = "unclean_stop"  # windows not scored across a kill -9 (their stream times)


@dataclass(frozen=True)
class LostStretch:
    first: float  # epoch seconds, agent clock
    last: float
    records: int
    ongoing: bool
    reason: str = DISK_FULL


class LossLog:
    def __init__(self) -> None:
        self._closed: deque[LostStretch] = deque(maxlen=KEPT)
        self._open: LostStretch | None = None
        self._lock = threading.Lock()  # written by the inference thread, read by heartbeats

    def lost(self, records: int, now: float) -> None:
        if records <= 0:
            return
        with self._lock:
            if self._open is None:
                self._open = LostStretch(now, now, records, True)
            else:
                self._open = replace(self._open, last=now, records=self._open.records + records)

    def gap(self, first: float, last: float, records: int, reason: str) -> None:
        """A closed stretch of `records` lost between `first` and `last`."""
        if records > 0:
            with self._lock:
                self._closed.append(LostStretch(first, last, records, False, reason))

    def written(self) -> None:
        """A write went through: the stretch in progress, if any, ends."""
        if self._open is None:  # read without the lock: the common path stays cheap
            return
        with self._lock:
            if self._open is not None:
                self._closed.append(replace(self._open, ongoing=False))
                self._open = None

    def recent(self) -> list[LostStretch]:
        with self._lock:
            return [*self._closed, *([self._open] if self._open else [])][-KEPT:]
