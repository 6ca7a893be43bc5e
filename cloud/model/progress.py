"""A plain progress bar for long CLI steps (no dependency; quiet when not a terminal)."""

from __future__ import annotations

import time
from typing import TextIO


class ProgressBar:
    """Call with (step, total, loss); redraws at most every 0.2 s."""

    def __init__(self, label: str, stream: TextIO, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._last = 0.0
        self._tty = stream.isatty()

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if step < total and now - self._last < (0.2 if self._tty else 10.0):
            return
        self._last = now
        done = int(self.width * step / max(total, 1))
        elapsed = now - self.started
        eta = elapsed / max(step, 1) * (total - step)
        line = (
            f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{total} "
            f"loss {loss:.4f} {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        )
        self.stream.write(("\r" if self._tty else "") + line + ("" if self._tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
