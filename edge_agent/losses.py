"""Where records were lost: the stretches of time in which the outbox could not be written
(disk full), with how many records each lost, for the heartbeat ("lost N predictions
between t1 and t2") and `autoglm device show`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace

KEPT = 20  # closed stretches remembered


@dataclass(frozen=True)
class LostStretch:
    first: float  # epoch seconds, agent clock
    last: float
    records: int
    ongoing: bool


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
