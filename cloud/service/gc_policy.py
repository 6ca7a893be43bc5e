"""The control plane process's garbage-collection policy.

CPython's cyclic collector stops the whole process while it scans; a full collection walks
every tracked object. With thousands of agent sessions open a plane holds millions of them,
and with the default young-generation threshold (700 allocations) short-lived per-heartbeat
objects were promoted often enough to trigger full collections every few seconds: pauses of
100-470 ms on the shared 2-core machine (`tests/benchmarks/bench_heartbeats.py`, gc callbacks),
every session's heartbeat ack waiting behind them. Two changes, as long-running CPython
servers commonly make:

- what exists before the plane serves (modules, classes, the store's metadata, protobuf
  descriptors) is moved out of the collector's reach with `gc.freeze()`: it lives as long as
  the process, and scanning it on every full collection bought nothing. Frozen before the
  ports open, so no session's objects are frozen with it (their cycles would never be freed);
- the young generation holds `YOUNG_THRESHOLD` allocations before a collection, so the
  objects of one heartbeat or one record batch die young instead of being promoted.

Cycles are still collected: only how often, and what is scanned, change.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000  # CPython's default is 700


def settle_before_serving() -> None:
    """Called once the plane is built, before it serves: collects the start-up garbage,
    freezes what is left and raises the young generation's threshold (the older ones keep
    their defaults)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
