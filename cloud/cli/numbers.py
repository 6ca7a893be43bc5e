"""Types for the CLI's numeric flags: a whole number or a finite decimal within the bounds the
API's fields and the code behind each flag take, so that a bad value is a usage error naming
the flag (argparse prints "argument --limit: ..."), never a traceback, a NaN sleep or a
deadline no call can meet."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

UINT32_MAX = 2**32 - 1  # the API's counts and limits are uint32
INT32_MAX = 2**31 - 1
SEED_MAX = UINT32_MAX  # NumPy and torch take seeds below 2**32


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def decimal(low: float, high: float, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from `low` (more than `low` when `above`) to
    `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:40]!r}")
        if (value <= low if above else value < low) or value > high:
            bound = f"more than {low:g}" if above else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


# Bounds of flags with no API field behind them: far past any sensible value, short of what
# would exhaust memory or overflow the code that takes them.
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_STEPS = 1_000_000  # rows of a window, a stride, a level, a smoothing
MAX_THREADS = 1024
MAX_TIMEOUT_S = 86_400.0  # --timeout: a day per call
MAX_WORKERS = 64  # CloudConfig.workers' bound
