"""Outbox -> control plane over the session: numbered record batches, acknowledged.

At least once on the wire, exactly once in the store: after a reconnect, sending resumes
after the highest sequence the control plane says it stored (SessionAccepted), so records in
flight when the link dropped are sent again and the control plane counts them as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from edge_agent.errors import LocalStateError
from edge_agent.outbox import Outbox
from edge_agent.retry import Backoff
from edge_agent.waits import event_or_timeout
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
    # The outbox could not record an acknowledgement (disk full): failed writes so far, and
    # the highest sequence the control plane acknowledged that it has not recorded (0: none).
    # Failed writes include the renumbering of an outbox behind the plane (`on_accepted`).
    ack_write_failures: int = 0
    unsaved_ack: int = 0


@dataclass
class _Unsaved:
    """An acknowledgement the outbox could not record yet, those after it merged in."""

    up_to: int
    rejected: dict[int, str] = field(default_factory=dict)


class RecordSync:
    """One per agent; `run` is started by the session for each open stream.

    Acknowledgements are written by a task of their own, off the session's reader, one write
    at a time in a worker thread, those arriving meanwhile merged into the next: a slow disk
    (each write is fsynced) must not stall reading the stream, or the control plane ends the
    session for not reading. Until written, an acknowledgement is kept here (`acked` counts
    it: the control plane has the records, so they are not sent again).

    An acknowledgement the outbox cannot record (a full disk) does not end the session
    either: it is written at the next one, at the next session's start, or at a retry
    (`ack_retry`) while batches are sent. Should the agent stop first, the next session's
    `last_stored_sequence` says the same."""

    def __init__(
        self,
        outbox: Outbox,
        batch_records: int,
        max_in_flight: int,
        ack_retry: Backoff | None = None,
    ) -> None:
        self.outbox = outbox
        self.batch_records = batch_records
        self.max_in_flight = max_in_flight
        self.ack_retry = ack_retry or Backoff(1.0, 30.0)
        self.stats = SyncStats(acked_up_to=outbox.acked)
        self._sent = outbox.acked
        self._in_flight: list[int] = []
        self._acked = asyncio.Event()
        # Acknowledged by the control plane, not recorded by the outbox yet (being written,
        # waiting for the writer, or failed), later ones merged in.
        self._unsaved: _Unsaved | None = None
        self._retry_at = 0.0
        self._failed_writes = 0  # of the acknowledgement waiting now
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        # The control plane's position at the session's start, while the outbox could not
        # take it (`_follow_plane`), and the failed tries.
        self._behind: int | None = None
        self._failed_follows = 0

    @property
    def acked(self) -> int:
        """Everything up to this sequence is stored by the control plane (recorded or not)."""
        return max(self.outbox.acked, self._unsaved.up_to if self._unsaved else 0)

    async def on_accepted(self, last_stored: int) -> None:
        """A new session: everything up to `last_stored` is safe; resend from there.

        A `last_stored` at or past every number the outbox gave out means the outbox was
        replaced or restored: its unsent records are renumbered after it first
        (`Outbox.follow_plane`), never acknowledged away. Until that is written (a full disk,
        an outbox that cannot be opened), nothing is sent or acknowledged; it is retried
        while the session goes on (`ack_retry`)."""
        self._in_flight.clear()
        self._behind = last_stored
        await self._follow_plane()

    async def _follow_plane(self) -> None:
        """Takes the control plane's position (`_behind`): renumbers the outbox if it is
        behind it, then acknowledges up to it (kept in `_behind` when it cannot be written)."""
        last_stored = self._behind
        assert last_stored is not None
        try:
            await asyncio.to_thread(self.outbox.follow_plane, last_stored)
        except LocalStateError as exc:
            self._retry_at = time.monotonic() + self.ack_retry.next_delay()
            self.stats.ack_write_failures += 1
            if not self._failed_follows:
                log.error(
                    "the control plane stored this device's records up to %d, and the outbox "
                    "cannot take that position (%s): nothing is sent or acknowledged until it "
                    "can (unsent records are not acknowledged away); retried",
                    last_stored,
                    exc,
                )
            self._failed_follows += 1
            return
        if self._failed_follows:
            log.warning(
                "the outbox took the control plane's position (%d) after %d failed try(s)",
                last_stored,
                self._failed_follows,
            )
            self._failed_follows = 0
            self.ack_retry.reset()
        self._behind = None
        if last_stored > self.acked or self._unsaved is not None:
            self._unsaved = self._merged(last_stored, {})
            await self._write()
        self._sent = self.acked
        self.stats.acked_up_to = self.acked

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
        self.stats.stored += ack.stored
        self.stats.duplicates += ack.duplicates
        self._in_flight = [s for s in self._in_flight if s > ack.up_to_sequence]
        self._acked.set()
        self._unsaved = self._merged(ack.up_to_sequence, rejected)
        self.stats.acked_up_to = self.acked
        if self._writer is None or self._writer.done():  # else the running one takes it
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def drain(self) -> None:
        """Until the acknowledgements received so far were written or failed to be."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write(self) -> None:
        """Writes the acknowledgement waiting, and then any merged in meanwhile, in a worker
        thread, one at a time; stops at a failure (retried by `retry_unsaved`)."""
        async with self._write_lock:
            while (pending := self._unsaved) is not None:
                try:
                    await asyncio.to_thread(self.outbox.ack, pending.up_to, pending.rejected)
                except LocalStateError as exc:  # the control plane has them: the session goes on
                    self._not_saved(exc)
                    return
                if self._unsaved is pending:  # else a newer one, covering it, is written next
                    self._saved()
                self.stats.acked_up_to = self.acked

    def _merged(self, up_to: int, rejected: Mapping[int, str]) -> _Unsaved:
        """The acknowledgement to write: this one and any not written yet."""
        if self._unsaved is None:
            return _Unsaved(up_to, dict(rejected))
        return _Unsaved(max(up_to, self._unsaved.up_to), {**self._unsaved.rejected, **rejected})

    def _not_saved(self, error: LocalStateError) -> None:
        pending = self._unsaved
        assert pending is not None
        first = not self._failed_writes
        self._retry_at = time.monotonic() + self.ack_retry.next_delay()
        self._failed_writes += 1
        self.stats.ack_write_failures += 1
        self.stats.unsaved_ack = pending.up_to
        if first:
            log.error(
                "the control plane stored the records up to %d, but the outbox cannot record "
                "that (%s): they stay in the outbox, are not sent again, and the session goes "
                "on; retried until it can be written (free disk space)",
                pending.up_to,
                error,
            )

    def _saved(self) -> None:
        pending = self._unsaved
        assert pending is not None
        if self._failed_writes:
            log.warning(
                "the outbox recorded the acknowledgement up to %d after %d failed write(s)",
                pending.up_to,
                self._failed_writes,
            )
        self._unsaved = None
        self._failed_writes = 0
        self.stats.unsaved_ack = 0
        self.ack_retry.reset()

    async def retry_unsaved(self, force: bool = False) -> None:
        """Writes the acknowledgement that could not be written, when its retry is due (or
        at once: `force`), or the control plane's position the outbox could not take at the
        session's start. Writes on a thread; acknowledgements arriving meanwhile merge."""
        waiting = self._behind is not None or self._failed_writes
        if not waiting or (not force and time.monotonic() < self._retry_at):
            return
        if self._behind is not None:
            await self._follow_plane()
        else:
            await self._write()

    async def run(self, send: Callable[[Outgoing], Awaitable[None]]) -> None:
        """Sends batches until cancelled (the session ends)."""
        while True:
            await self.retry_unsaved()
            if self._behind is not None:  # the outbox did not take the plane's position yet
                await asyncio.sleep(_IDLE_WAIT_S)
                continue
            if len(self._in_flight) >= self.max_in_flight:
                self._acked.clear()
                await event_or_timeout(self._acked, _IDLE_WAIT_S)  # a retry may come due
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
