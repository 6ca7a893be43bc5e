"""A full disk while the control plane acknowledges records: the outbox cannot record the
acknowledgement, and the session must go on (heartbeats, presence) rather than end and flap
at each reconnect; the acknowledgement is written once there is space, and no record is lost
or sent twice meanwhile.

The full disk is `DiskFullConnection` (tests/test_disk_full.py): SQLite's "database or disk
is full" at COMMIT."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.json_format import MessageToDict

from cloud.rollout_targets import agent_errors
from edge_agent.agent import ACK_WRITE_FAILED, Agent
from edge_agent.decisions import Verdict
from edge_agent.outbox import PREDICTION, Outbox
from edge_agent.retry import Backoff
from edge_agent.sync import RecordSync
from edge_agent.wire import prediction_record
from protos.autoglm.v1 import agent_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane
from tests.support.records import stored_sequences
from tests.test_disk_full import DiskFullConnection, FullAtWrite

T = 1_790_000_000.0


def _predictions(n: int, first: int = 0) -> list[tuple[int, bytes]]:
    return [
        (
            PREDICTION,
            prediction_record(Verdict("pump-1", 0.5, 0.5, False, {}, T + i - 10, T + i, None), "1"),
        )
        for i in range(first, first + n)
    ]


def _ack(up_to: int, stored: int, rejected: dict[int, str] | None = None) -> agent_pb2.BatchAck:
    ack = agent_pb2.BatchAck(up_to_sequence=up_to, stored=stored)
    for seq, reason in (rejected or {}).items():
        ack.rejected.add(sequence=seq, reason=reason)
    return ack


@pytest.mark.integration
def test_a_full_disk_keeps_the_session_while_acknowledgements_cannot_be_written(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "edge")
    device_id = identity.info.device_id
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    box.append(_predictions(20))
    real = box._db
    box._db = DiskFullConnection(real)  # type: ignore[assignment]
    sync = RecordSync(box, 5, 2)
    agent = start_session(identity, heartbeat_interval_s=0.1, sync=sync)
    try:
        wait_for(lambda: stored_sequences(plane.plane.store, device_id) == list(range(1, 21)))
        stats = agent.session.stats
        beats = stats.heartbeats_acked
        wait_for(lambda: stats.heartbeats_acked >= beats + 5 or stats.attempts_failed > 0)
        assert stats.attempts_failed == 0, stats.last_error  # the session went on
        assert stats.sessions_opened == 1, stats
        assert box.acked == 0 and box.stats().depth == 20  # not marked, nothing lost
        assert sync.stats.unsaved_ack == 20 and sync.stats.ack_write_failures >= 1, sync.stats
        assert sync.stats.records_sent == 20, sync.stats  # each once
    finally:
        agent.stop()
    # A restart while the disk is still full: the plane's position is taken, nothing resent.
    again = RecordSync(box, 5, 2)
    agent = start_session(identity, heartbeat_interval_s=0.1, sync=again)
    try:
        wait_for(lambda: again.stats.unsaved_ack == 20 or agent.session.stats.attempts_failed > 0)
        stats = agent.session.stats
        beats = stats.heartbeats_acked
        wait_for(lambda: stats.heartbeats_acked >= beats + 5 or stats.attempts_failed > 0)
        assert stats.attempts_failed == 0, stats.last_error
        assert again.stats.records_sent == 0, again.stats
        box._db = real  # space again: the acknowledgement is written at the next try
        # Both: the outbox records it in a worker thread, the sync clears its copy after.
        wait_for(lambda: box.acked == 20 and again.stats.unsaved_ack == 0, timeout=60)
        assert box.stats().depth == 0, box.stats()
        assert stats.attempts_failed == 0, stats.last_error
    finally:
        agent.stop()
        box._db = real
        box.close()
    assert stored_sequences(plane.plane.store, device_id) == list(range(1, 21))


@pytest.mark.unit
def test_acknowledgements_that_cannot_be_written_wait_together_and_lose_no_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edge_agent.sync")
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    box.append(_predictions(10))
    real = box._db
    box._db = DiskFullConnection(real)  # type: ignore[assignment]
    sync = RecordSync(box, 5, 2, ack_retry=Backoff(0.01, 0.01))

    async def acks() -> None:
        sync.on_ack(_ack(4, 3, {2: "score out of range"}))  # raised out of the session's reader
        await sync.drain()
        sync.on_ack(_ack(8, 4, {7: "asset name too long"}))
        await sync.drain()

    asyncio.run(acks())
    assert (box.acked, box.stats().depth, sync.stats.unsaved_ack) == (0, 10, 8), sync.stats
    assert sync.stats.ack_write_failures == 2 and sync.stats.stored == 7
    box._db = real
    asyncio.run(sync.retry_unsaved(force=True))
    assert (box.acked, box.stats().depth, sync.stats.unsaved_ack) == (8, 2, 0), sync.stats
    assert [(seq, reason) for seq, _, _, reason in box.quarantined()] == [
        (7, "asset name too long"),
        (2, "score out of range"),
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "disk is full" in errors[0] and "up to 4" in errors[0], errors
    assert any("up to 8 after 2 failed write(s)" in r.getMessage() for r in caplog.records)


class _Ended(Exception):
    pass


@pytest.mark.unit
def test_a_new_session_while_the_disk_is_full_resumes_after_what_the_plane_stored(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    box.append(_predictions(10))
    real = box._db
    box._db = DiskFullConnection(real)  # type: ignore[assignment]
    sync = RecordSync(box, 100, 2)
    asyncio.run(sync.on_accepted(6))  # raised: the session ended before its heartbeats
    assert sync.stats.unsaved_ack == 6 and box.acked == 0
    sent: list[bytes] = []

    async def one_batch() -> None:
        async def send(message: object) -> None:
            assert isinstance(message, bytes)
            sent.append(message)
            raise _Ended  # the session ends after its first batch

        with pytest.raises(_Ended):
            await sync.run(send)

    asyncio.run(one_batch())
    batch = agent_pb2.AgentMessage.FromString(sent[0]).records
    assert [r.sequence for r in batch.records] == [7, 8, 9, 10]
    box._db = real


@pytest.mark.unit
def test_sequences_the_plane_knows_are_not_reused_while_its_ack_cannot_be_written(
    tmp_path: Path,
) -> None:
    """An outbox behind the plane (a state directory restored from a backup) learns the
    plane's position at the session's start and renumbers its unsent records after it
    (tests/test_outbox_renumber.py); when that cannot be written, nothing is acknowledged,
    and appends made once there is space are renumbered with them: none is deleted unsent
    (before, the two it had were, by the acknowledgement written later)."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    box.append(_predictions(2))
    real = box._db
    box._db = FullAtWrite(real)  # type: ignore[assignment]
    sync = RecordSync(box, 100, 2)
    asyncio.run(sync.on_accepted(50))
    assert sync.stats.ack_write_failures == 1 and box.acked == 0
    box._db = real
    assert box.append(_predictions(1, first=2)) == [3]
    asyncio.run(sync.retry_unsaved(force=True))
    assert box.acked == 50 and [seq for seq, _, _ in box.pending(0, 10)] == [51, 52, 53]


@pytest.mark.unit
def test_a_full_disk_during_a_soak_is_not_counted_as_agent_errors(tmp_path: Path) -> None:
    """Acknowledgements the full disk refuses are reported as a local disk problem
    (dropped_by_reason ack_write_failed), not as `errors`, which a rollout's shadow gate
    holds against the model soaking (max_agent_errors, 10 by default)."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 24)
    box.append(_predictions(12))
    real = box._db
    sync = RecordSync(box, 100, 2)
    runtime = SimpleNamespace(
        health=lambda disk_free, rates: agent_pb2.AgentHealth(errors=2, disk_free_bytes=disk_free)
    )
    agent = SimpleNamespace(
        runtime=runtime, sync=sync, outbox=box, config=SimpleNamespace(state_dir=tmp_path)
    )
    before = Agent.health(agent)  # type: ignore[arg-type]
    at_install = agent_errors(MessageToDict(before, preserving_proto_field_name=True))
    box._db = DiskFullConnection(real)  # type: ignore[assignment]

    async def acks() -> None:
        for up_to in range(1, 13):  # one failed write each
            sync.on_ack(_ack(up_to, 1))
            await sync.drain()

    asyncio.run(acks())
    box._db = real
    assert sync.stats.ack_write_failures == 12, sync.stats
    health = Agent.health(agent)  # type: ignore[arg-type]
    assert health.errors == 2, health
    assert health.dropped_by_reason[ACK_WRITE_FAILED] == 12, health
    assert health.disk_free_bytes > 0, health
    soaked = agent_errors(MessageToDict(health, preserving_proto_field_name=True))
    assert soaked - at_install == 0, "the soaking model would be blamed for the disk"
