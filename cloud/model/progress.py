"""A plain progress bar for long CLI steps (no dependency; quiet when not a terminal)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    """Call with (step, total, loss) (loss None: not shown); redraws at most every 0.2 s.
    With `unit="bytes"`, steps are bytes and the line shows sizes and the rate.

    The time left is estimated from the rate since the first report, not since the start:
    the first step carries the warm-up (loading, first batches, connection), which made a
    7-99 s step announce ~844 s. Until a second report past step 0 there is no estimate."""

    def __init__(
        self,
        label: str,
        stream: TextIO,
        width: int = 30,
        unit: str = "steps",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.unit = unit
        self.clock = clock
        self.started = clock()
        self._last = 0.0
        self._first: tuple[float, int] | None = None  # (time, step) of the first report
        self._tty = stream.isatty()

    def _left(self, now: float, step: int, total: int) -> str:
        if step >= total:
            return "done"
        if self._first is None and step > 0:
            self._first = (now, step)
        since, first_step = self._first or (now, step)
        if step <= first_step or now <= since:
            return "estimating"
        rate = (step - first_step) / (now - since)
        return f"~{(total - step) / rate:.0f}s left"

    def __call__(self, step: int, total: int, loss: float | None = None) -> None:
        now = self.clock()
        left = self._left(now, step, total)
        if step < total and now - self._last < (0.2 if self._tty else 10.0):
            return
        self._last = now
        done = int(self.width * step / max(total, 1))
        elapsed = now - self.started
        if self.unit == "bytes":
            rate = step / elapsed if elapsed > 0 else 0.0
            count = f"{_bytes(step)}/{_bytes(total)} {_bytes(rate)}/s"
        else:
            count = f"{step}/{total}"
        shown = f" loss {loss:.4f}" if loss is not None else ""
        line = (
            f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {count}{shown} "
            f"{elapsed:.0f}s elapsed, {left}"
        )
        self.stream.write(("\r" if self._tty else "") + line + ("" if self._tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
