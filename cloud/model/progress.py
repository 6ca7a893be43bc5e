"""A plain progress bar for long CLI steps (no dependency; quiet when not a terminal)."""

from __future__ import annotations

import time
from typing import TextIO


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    """Call with (step, total, loss) (loss None: not shown); redraws at most every 0.2 s.
    With `unit="bytes"`, steps are bytes and the line shows sizes and the rate."""

    def __init__(self, label: str, stream: TextIO, width: int = 30, unit: str = "steps") -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.unit = unit
        self.started = time.monotonic()
        self._last = 0.0
        self._tty = stream.isatty()

    def __call__(self, step: int, total: int, loss: float | None = None) -> None:
        now = time.monotonic()
        if step < total and now - self._last < (0.2 if self._tty else 10.0):
            return
        self._last = now
        done = int(self.width * step / max(total, 1))
        elapsed = now - self.started
        eta = elapsed / max(step, 1) * (total - step)
        if self.unit == "bytes":
            rate = step / elapsed if elapsed > 0 else 0.0
            count = f"{_bytes(step)}/{_bytes(total)} {_bytes(rate)}/s"
        else:
            count = f"{step}/{total}"
        shown = f" loss {loss:.4f}" if loss is not None else ""
        line = (
            f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {count}{shown} "
            f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        )
        self.stream.write(("\r" if self._tty else "") + line + ("" if self._tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
