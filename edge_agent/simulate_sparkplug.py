"""`autoglm-edge simulate --protocol sparkplug`: the simulated streams as a Sparkplug B edge
node would publish them: NBIRTH (bdSeq), a DBIRTH per asset naming its metrics (Double,
with aliases), then DDATA by alias, `--batch` rows per message with metric timestamps; one
`seq` across the node's messages; NDEATH as the will and on the way out."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from edge_agent.errors import InvalidInput
from edge_agent.ingest.sparkplug import DOUBLE, INT64, NAMESPACE
from edge_agent.simulate import Stream
from protos.sparkplug import sparkplug_b_pb2 as spb


class SimulatedNode:
    def __init__(
        self,
        group: str,
        edge_node: str,
        devices: Sequence[tuple[str, Sequence[str]]],  # (device id, its metric names)
        bd_seq: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.group = group
        self.edge_node = edge_node
        self.devices = {device: list(names) for device, names in devices}
        self.bd_seq = bd_seq
        self.clock = clock
        self._seq = 0

    def topic(self, kind: str, device: str = "") -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.edge_node}"
        return f"{base}/{device}" if device else base

    def _stamped(self, message: spb.Payload) -> bytes:
        message.seq = self._seq
        self._seq = (self._seq + 1) % 256
        return message.SerializeToString()

    def death(self) -> tuple[str, bytes]:
        message = spb.Payload(timestamp=int(self.clock() * 1000))
        message.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq)
        return self.topic("NDEATH"), message.SerializeToString()

    def births(self) -> list[tuple[str, bytes]]:
        self._seq = 0
        now = int(self.clock() * 1000)
        node = spb.Payload(timestamp=now)
        node.metrics.add(name="bdSeq", datatype=INT64, long_value=self.bd_seq)
        out = [(self.topic("NBIRTH"), self._stamped(node))]
        for device, names in self.devices.items():
            birth = spb.Payload(timestamp=now)
            for alias, name in enumerate(names, start=1):
                birth.metrics.add(name=name, alias=alias, datatype=DOUBLE, is_null=True)
            out.append((self.topic("DBIRTH", device), self._stamped(birth)))
        return out

    def data(self, device: str, ts: np.ndarray, block: np.ndarray) -> tuple[str, bytes]:
        """DDATA of `block` [rows, metrics] at `ts` (seconds); NaN cells are left out."""
        message = spb.Payload(timestamp=int(self.clock() * 1000))
        for r in range(block.shape[0]):
            stamp = int(float(ts[r]) * 1000)
            for j in range(block.shape[1]):
                value = float(block[r, j])
                if value == value:
                    message.metrics.add(alias=j + 1, timestamp=stamp, double_value=value)
        return self.topic("DDATA", device), self._stamped(message)


def publish_node(
    publish: Callable[[str, bytes], None],
    node: SimulatedNode,
    streams: Sequence[tuple[str, Stream]],  # (device id, stream)
    speed: float,
    batch: int = 1,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Births, then each stream's rows as DDATA interleaved in time at `speed` x real time
    (0: flat out; timestamps as `publish_streams` makes them); returns messages sent."""
    if speed < 0:
        raise InvalidInput(f"simulate: speed must be >= 0, got {speed}")
    sent = 0
    for topic, payload in node.births():
        publish(topic, payload)
        sent += 1
    started = clock()
    rows = max(1, batch)

    def blocks(i: int) -> Iterator[tuple[float, int, int, int]]:
        stream = streams[i][1]
        for start in range(0, stream.values.shape[0], rows):
            stop = min(start + rows, stream.values.shape[0])
            yield float(stream.offsets[stop - 1]), i, start, stop

    anchors = []
    for _, stream in streams:
        duration = float(stream.offsets[-1]) if stream.offsets.size else 0.0
        if speed == 0:
            anchors.append(started - duration)
        elif speed >= 1:
            anchors.append(started - duration * (1.0 - 1.0 / speed))
        else:
            anchors.append(started)
    for offset, i, start, stop in heapq.merge(*(blocks(i) for i in range(len(streams)))):
        if speed > 0 and (wait := started + offset / speed - clock()) > 0:
            sleep(wait)
        device, stream = streams[i]
        ts = anchors[i] + stream.offsets[start:stop]
        publish(*node.data(device, ts, stream.values[start:stop]))
        sent += 1
    return sent
