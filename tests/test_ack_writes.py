"""Acknowledgements are written off the session's event loop: a slow disk (each write is
fsynced) no longer stalls reading the stream, which made the control plane end the session
for not reading. Written one at a time, in order, those arriving meanwhile merged into the
next write with their refusals."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from edge_agent.outbox import PREDICTION, Outbox
from edge_agent.sync import RecordSync
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit


class SlowDisk(Outbox):
    """The real outbox whose acknowledgement writes wait for `gate` (at most 10 s)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 24, ballast_bytes=0)
        self.gate = threading.Event()
        self.writes: list[int] = []
        self.stalled = False

    def ack(self, up_to: int, rejected: Mapping[int, str] | None = None) -> int:
        self.writes.append(up_to)
        if not self.gate.wait(10):
            self.stalled = True  # nobody on the event loop could open the gate
        return super().ack(up_to, rejected)


def _ack(up_to: int, rejected: dict[int, str] | None = None) -> agent_pb2.BatchAck:
    ack = agent_pb2.BatchAck(up_to_sequence=up_to, stored=up_to)
    for seq, reason in (rejected or {}).items():
        ack.rejected.add(sequence=seq, reason=reason)
    return ack


def test_a_slow_acknowledgement_write_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    box = SlowDisk(tmp_path / "outbox.sqlite3")
    box.append([(PREDICTION, b"p")] * 10)
    sync = RecordSync(box, 100, 4)

    async def session() -> None:
        loop = asyncio.get_running_loop()
        sync.on_ack(_ack(3))  # in the reader: must return while the write waits for the disk
        loop.call_soon(box.gate.set)  # the loop runs on: it opens the gate
        assert sync.acked == 3  # counted as acknowledged at once (nothing sent again)
        await sync.drain()

    asyncio.run(session())
    assert not box.stalled, "the acknowledgement was written on the event loop"
    assert box.acked == 3 and box.stats().depth == 7


def test_acknowledgements_arriving_during_a_write_are_merged_into_the_next(
    tmp_path: Path,
) -> None:
    box = SlowDisk(tmp_path / "outbox.sqlite3")
    box.append([(PREDICTION, b"p")] * 10)
    sync = RecordSync(box, 100, 4)

    async def session() -> None:
        sync.on_ack(_ack(2, {1: "first refusal"}))
        while not box.writes:  # the first write is under way (waiting for the disk)
            await asyncio.sleep(0.001)
        sync.on_ack(_ack(5, {4: "second refusal"}))
        sync.on_ack(_ack(8))
        assert sync.acked == 8
        box.gate.set()
        await sync.drain()

    asyncio.run(session())
    assert box.writes == [2, 8], box.writes  # in order, the later two in one write
    assert box.acked == 8 and [s for s, _, _ in box.pending(0, 10)] == [9, 10]
    assert sorted((s, r) for s, _, _, r in box.quarantined()) == [
        (1, "first refusal"),
        (4, "second refusal"),
    ]
    assert sync.stats.unsaved_ack == 0 and sync.stats.ack_write_failures == 0
