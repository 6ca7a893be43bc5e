"""How many threads a compute library gets when nobody said: chosen, never the library's own
default. ONNX Runtime and torch default to every core and spin while waiting; several such
processes on a shared machine spin against each other. Seen here: a 36 s training took 15
CPU-minutes with torch's default; eight evaluations side by side on a 16-core machine, torch
on one thread each but ONNX Runtime on its default, all ran past 8 minutes, while one alone
(on a lighter setting) took 2."""

from __future__ import annotations

import os

DEFAULT_CAP = 2  # the networks here are small: more threads gain little


def compute_threads(requested: int = 0) -> int:
    """`requested` if positive, else the cores this process may run on, at most 2."""
    if requested > 0:
        return requested
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(DEFAULT_CAP, available))
