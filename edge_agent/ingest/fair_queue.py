"""Decoded readings waiting for the pipeline thread: one FIFO per asset, drained round robin.

An asset that floods the agent (a misconfigured PLC, a replayed backlog, a hostile
publisher) waits behind its own backlog, not behind another asset's: each drain pass takes
one message from every asset that has any, in turn. Each asset may hold at most
`max_readings` readings waiting. Past that, the source delivering more for it waits (for
MQTT QoS 1 the broker keeps the rest: back-pressure, nothing lost) for at most `block_s`;
then the message is dropped and counted (`backlog_full`), so a pipeline that cannot keep up
never grows the agent's memory without bound. A source shared by several assets (the one
MQTT connection) that waits on a full asset delays the others' next messages by the time
the pipeline takes to work that asset's budget down -- bounded, and the reason the budget
is a few seconds of work rather than hours of readings. Every source (MQTT's network
thread, Modbus and OPC UA threads) puts; only the pipeline takes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from edge_agent.ingest.decode import Chunk, Decoded


def _readings(item: Decoded) -> int:
    if isinstance(item, tuple):
        return 1
    return sum(int(c.ts.size) for c in item)


def _by_asset(item: Decoded) -> list[tuple[int, Decoded]]:
    """A message split by asset (a PLC polled for several assets delivers one list)."""
    if isinstance(item, tuple):
        return [(item[0], item)]
    assets = {c.asset for c in item}
    if len(assets) == 1:
        return [(item[0].asset, item)] if item else []
    parts: dict[int, list[Chunk]] = {}
    for chunk in item:
        parts.setdefault(chunk.asset, []).append(chunk)
    return list(parts.items())


class FairQueue:
    def __init__(
        self,
        assets: int,
        max_readings: int,
        on_drop: Callable[[int, int], None],
        block_s: float = 5.0,
    ) -> None:
        self.max_readings = max_readings
        self.block_s = block_s
        self.on_drop = on_drop  # (asset, readings) for each message dropped as over budget
        self._queues: list[deque[tuple[Decoded, int]]] = [deque() for _ in range(assets)]
        self._pending = [0] * assets  # readings waiting, by asset
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # a message arrived (the pipeline waits)
        self._room = threading.Condition(lock)  # the pipeline took some (full sources wait)
        self._next = 0  # where the next round starts, so no asset is always first
        self._takers = 0  # pipelines waiting for a message: only then is there one to wake

    def put(self, item: Decoded) -> None:
        if isinstance(item, tuple):  # the common case, kept cheap
            self._put(item[0], item, 1)
            return
        for asset, part in _by_asset(item):
            self._put(asset, part, _readings(part))

    def _put(self, asset: int, part: Decoded, n: int) -> None:
        pending = self._pending
        with self._cond:
            # One message always fits an empty queue, however large: the decoder bounds it.
            room = not pending[asset] or pending[asset] + n <= self.max_readings
            if not room:
                room = self._room.wait_for(
                    lambda: not pending[asset] or pending[asset] + n <= self.max_readings,
                    self.block_s,
                )
            if room:
                self._queues[asset].append((part, n))
                pending[asset] += n
                if self._takers:
                    self._cond.notify()  # the pipeline, waiting for a message
        if not room:
            self.on_drop(asset, n)

    def _take_from(self, asset: int, most: int, taken: list[Decoded]) -> None:
        queue = self._queues[asset]
        for _ in range(min(most, len(queue))):
            part, n = queue.popleft()
            self._pending[asset] -= n
            taken.append(part)

    def pending(self, asset: int) -> int:
        with self._cond:
            return self._pending[asset]

    def empty(self) -> bool:
        with self._cond:
            return not any(self._pending)

    def take(self, limit: int, timeout: float) -> list[Decoded]:
        """Up to `limit` messages, one per asset in turn; [] when none came within
        `timeout` seconds."""
        with self._cond:
            if not any(self._pending):
                self._takers += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._takers -= 1
            taken: list[Decoded] = []
            count = len(self._queues)
            start, self._next = self._next, (self._next + 1) % max(count, 1)
            while len(taken) < limit:
                busy = [i for i in range(count) if self._queues[(start + i) % count]]
                if len(busy) == 1:  # one asset left: the rest of its turns at once
                    self._take_from((start + busy[0]) % count, limit - len(taken), taken)
                    break
                progressed = False
                for step in busy:
                    if len(taken) < limit:
                        self._take_from((start + step) % count, 1, taken)
                        progressed = True
                if not progressed:
                    break
            if taken:
                self._room.notify_all()  # sources waiting on a full asset look again
            return taken
