"""Outbox -> control plane over the session: numbered record batches, acknowledged.

At least once on the wire, exactly once in the store: after a reconnect, sending resumes
after the highest sequence the control plane says it stored (SessionAccepted), so records in
flight when the link dropped are sent again and the control plane counts them as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge_agent.outbox import Outbox
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
# What the session writes on its stream: a message, or one already serialized.
Outgoing = agent_pb2.AgentMessage | bytes
_IDLE_WAIT_S = 0.5
# Encoded records per batch, at most (one record always goes): window captures are kilobytes
# each, and the control plane takes messages of up to 8 MiB.
MAX_BATCH_BYTES = 2 << 20


@dataclass
class SyncStats:
    batches_sent: int = 0
    records_sent: int = 0
    acked_up_to: int = 0
    stored: int = 0
    duplicates: int = 0


class RecordSync:
    """One per agent; `run` is started by the session for each open stream."""

    def __init__(self, outbox: Outbox, batch_records: int, max_in_flight: int) -> None:
        self.outbox = outbox
        self.batch_records = batch_records
        self.max_in_flight = max_in_flight
        self.stats = SyncStats(acked_up_to=outbox.acked)
        self._sent = outbox.acked
        self._in_flight: list[int] = []
        self._acked = asyncio.Event()

    async def on_accepted(self, last_stored: int) -> None:
        """A new session: everything up to `last_stored` is safe; resend from there."""
        if last_stored > self.outbox.acked:
            await asyncio.to_thread(self.outbox.ack, last_stored)
        self._sent = self.outbox.acked
        self._in_flight.clear()
        self.stats.acked_up_to = self.outbox.acked

    def on_ack(self, ack: agent_pb2.BatchAck) -> None:
        rejected = {r.sequence: r.reason for r in ack.rejected}
        if rejected:
            first = ack.rejected[0]
            log.warning(
                "the control plane refused %d record(s); kept in the outbox's quarantine "
                "(first: %d: %s)",
                len(rejected),
                first.sequence,
                first.reason,
            )
        self.outbox.ack(ack.up_to_sequence, rejected)
        self.stats.acked_up_to = self.outbox.acked
        self.stats.stored += ack.stored
        self.stats.duplicates += ack.duplicates
        self._in_flight = [s for s in self._in_flight if s > ack.up_to_sequence]
        self._acked.set()

    async def run(self, send: Callable[[Outgoing], Awaitable[None]]) -> None:
        """Sends batches until cancelled (the session ends)."""
        while True:
            if len(self._in_flight) >= self.max_in_flight:
                self._acked.clear()
                await self._acked.wait()
                continue
            rows = await asyncio.to_thread(self.outbox.pending, self._sent, self.batch_records)
            if not rows:
                await asyncio.to_thread(self.outbox.wait_for_records, self._sent, _IDLE_WAIT_S)
                continue
            rows = rows[: _fitting(rows)]
            await send(encode_batch(rows))
            self._sent = rows[-1][0]
            self._in_flight.append(self._sent)
            self.stats.batches_sent += 1
            self.stats.records_sent += len(rows)


# The AgentMessage of a batch is written as bytes: each outbox body is a serialized Record
# without its sequence, and protobuf fields may come in any order, so a record on the wire is
# the body followed by its sequence field; no message is parsed or built per record.
_RECORDS_FIELD = b"\x1a"  # AgentMessage.records, length-delimited
_RECORD_FIELD = b"\x0a"  # RecordBatch.records, length-delimited
_SEQUENCE_FIELD = b"\x08"  # Record.sequence, varint
_SMALL = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch(rows: list[tuple[int, int, bytes]]) -> bytes:
    """The serialized AgentMessage carrying `rows` (seq, kind, body) as a RecordBatch."""
    parts = []
    for seq, _kind, body in rows:
        record = body + _SEQUENCE_FIELD + _varint(seq)
        parts.append(_RECORD_FIELD + _varint(len(record)) + record)
    batch = b"".join(parts)
    return _RECORDS_FIELD + _varint(len(batch)) + batch


def _fitting(rows: list[tuple[int, int, bytes]]) -> int:
    """How many of `rows` (at least one) fit in MAX_BATCH_BYTES."""
    size = 0
    for i, (_seq, _kind, body) in enumerate(rows):
        size += len(body)
        if i and size > MAX_BATCH_BYTES:
            return i
    return len(rows)
