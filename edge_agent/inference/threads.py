"""How many threads a compute library gets when nobody said: chosen, never the library's own
default. ONNX Runtime and torch default to every core and spin while waiting; several such
processes on a shared machine spin against each other (a 36 s training took 15 CPU-minutes
that way, and eight one-thread evaluations side by side on 16 cores did not finish in 8
minutes while each runs in about 2 on its own)."""

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
