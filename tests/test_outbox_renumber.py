"""An outbox the control plane is ahead of: a new file (a damaged one moved aside) or a state
directory restored from a backup numbers its records from where that file left off, numbers
the plane already stored. Before, the session's start acknowledged everything up to the
plane's position and so deleted the unsent records (an alert raise among them); sent, the
plane would have dropped them as duplicates. Now they are renumbered after the plane's
position, in order, and sent."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cloud.domain import AlertFilter, AlertState
from edge_agent.decisions import RAISED, AlertEvent, Verdict
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.retry import Backoff
from edge_agent.sync import RecordSync
from edge_agent.wire import alert_record, prediction_record
from protos.autoglm.v1 import agent_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane
from tests.support.records import stored_sequences
from tests.test_disk_full import DiskFullConnection

T = 1_790_000_000.0
MIB = 1 << 20


def _predictions(n: int, first: int = 0) -> list[tuple[int, bytes]]:
    return [
        (
            PREDICTION,
            prediction_record(Verdict("pump-1", 0.5, 0.5, False, {}, T + i - 10, T + i, None), "1"),
        )
        for i in range(first, first + n)
    ]


def _raise(asset: str = "pump-1") -> AlertEvent:
    return AlertEvent(
        RAISED, f"{asset}-k1", asset, 0.9, (("temp", 0.8),), T - 10, T, T, "1", "overheat"
    )


def _move_aside(path: Path) -> None:
    """What an operator does with a damaged outbox: the file and its WAL go elsewhere."""
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name + ".damaged"))


def _accept(sync: RecordSync, last_stored: int) -> None:
    asyncio.run(sync.on_accepted(last_stored))


@pytest.mark.unit
def test_a_new_outbox_behind_the_plane_renumbers_its_unsent_records_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path, 64 * MIB)
    first.append([(PREDICTION, b"x")] * 500)
    first.ack(500)
    first.close()
    _move_aside(path)
    box = Outbox(path, 64 * MIB)
    alert = '{"open": "pump-1"}'
    records = [(ALERT, b"RAISE"), *[(PREDICTION, b"p%d" % i) for i in range(40)]]
    assert box.append(records, {"pump-1": T}, {"pump-1": alert}) == list(range(1, 42))

    caplog.set_level(logging.WARNING, "edge_agent.outbox")
    sync = RecordSync(box, 2000, 4)
    _accept(sync, 500)  # SessionAccepted.last_stored_sequence

    pending = box.pending(sync._sent, 100)
    assert [seq for seq, _, _ in pending] == list(range(501, 542)), "deleted or not renumbered"
    assert [(kind, body) for _, kind, body in pending] == records  # in order, unchanged
    stats = box.stats()
    assert (stats.depth, stats.acked, stats.next_sequence) == (41, 500, 542), stats
    assert box.open_alert_events() == {"pump-1": alert} and box.scored_through() == {"pump-1": T}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "up to 500" in warning and "41 unsent record(s) 1..41 renumbered 501..541" in warning
    box.close()

    again = Outbox(path, 64 * MIB)  # written in one transaction: a restart keeps it
    assert (again.acked, again.stats().next_sequence) == (500, 542)
    assert again.append([(PREDICTION, b"next")]) == [542]
    _accept(RecordSync(again, 2000, 4), 500)  # the next session: nothing moves again
    assert [seq for seq, _, _ in again.pending(500, 100)] == list(range(501, 543))
    again.close()


@pytest.mark.unit
def test_an_outbox_restored_from_a_backup_sends_what_it_kept_after_the_plane(
    tmp_path: Path,
) -> None:
    """The backup's unsent records (61..100) were sent by the lost outbox too, under the same
    numbers: renumbered, the plane stores them a second time. Records written after the
    restore (101..110) cannot be told from them by number, and losing them is worse."""
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 64 * MIB)
    box.append([(PREDICTION, b"before %d" % i) for i in range(1, 101)])
    box.ack(60)
    box.close()
    backup = tmp_path / "backup.sqlite3"
    shutil.copy(path, backup)  # closed: the WAL was checkpointed into the file
    box = Outbox(path, 64 * MIB)
    box.append([(PREDICTION, b"lost %d" % i) for i in range(101, 151)])
    box.ack(150)  # the plane has 1..150
    box.close()
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    shutil.copy(backup, path)

    restored = Outbox(path, 64 * MIB)
    assert (restored.acked, restored.stats().next_sequence) == (60, 101)
    restored.append([(PREDICTION, b"after %d" % i) for i in range(1, 11)])
    sync = RecordSync(restored, 2000, 4)
    _accept(sync, 150)

    pending = restored.pending(sync._sent, 100)
    assert [seq for seq, _, _ in pending] == list(range(151, 201))
    bodies = [b"before %d" % i for i in range(61, 101)] + [b"after %d" % i for i in range(1, 11)]
    assert [body for _, _, body in pending] == bodies
    assert (restored.acked, restored.stats().next_sequence) == (150, 201)
    restored.close()


class RenumberFails(DiskFullConnection):
    """A full disk for the renumbering's rewrite of every unsent record (its WAL is about
    the records' size), while appends, a page at a time, still fit."""

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("UPDATE records SET seq"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)


@pytest.mark.unit
def test_a_renumbering_that_cannot_be_written_holds_sending_and_acknowledging(
    tmp_path: Path,
) -> None:
    """Nothing goes out and nothing is acknowledged away while it fails, the session goes
    on; appends meanwhile pass the plane's position and are renumbered with the rest."""
    box = Outbox(tmp_path / "outbox.sqlite3", 64 * MIB, ballast_bytes=0)
    old, new = _predictions(41), _predictions(20, first=41)
    box.append(old)
    real = box._db
    assert real is not None
    box._db = RenumberFails(real)  # type: ignore[assignment]
    sync = RecordSync(box, 1000, 4, ack_retry=Backoff(0.01, 0.01))
    _accept(sync, 50)  # does not raise: the session goes on
    assert (box.acked, box.stats().depth, sync.stats.ack_write_failures) == (0, 41, 1)
    box.append(new)  # 42..61, past 50
    sent: list[int] = []
    renumbered = asyncio.Event()

    async def send(message: object) -> None:
        assert isinstance(message, bytes)
        batch = agent_pb2.AgentMessage.FromString(message).records
        sent.extend(r.sequence for r in batch.records)
        if len(sent) >= 61:
            renumbered.set()

    async def session() -> None:
        task = asyncio.create_task(sync.run(send))
        while sync.stats.ack_write_failures < 4:  # tried again, and again failed
            await asyncio.sleep(0.01)
        assert not sent and box.acked == 0 and box.stats().depth == 61
        box._db = real  # space again
        await asyncio.wait_for(renumbered.wait(), 30)
        task.cancel()

    asyncio.run(session())
    # Everything above both the plane's numbers and the outbox's own (61), in order.
    assert sent == list(range(62, 123)), sent
    assert [(kind, body) for _, kind, body in box.pending(0, 100)] == old + new
    assert box.acked == 50 and sync.stats.acked_up_to == 50
    box.close()


@pytest.mark.integration
def test_the_plane_stores_what_a_replaced_outbox_kept_unsent(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "edge")
    device_id = identity.info.device_id
    store = plane.plane.store
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 64 * MIB)
    box.append(_predictions(20))
    sync = RecordSync(box, 50, 2)
    agent = start_session(identity, heartbeat_interval_s=0.1, sync=sync)
    try:
        wait_for(lambda: box.acked == 20)
    finally:
        agent.stop()
        box.close()
    _move_aside(path)

    fresh = Outbox(path, 64 * MIB)  # offline meanwhile: an alert raised, predictions kept
    fresh.append([(ALERT, alert_record(_raise())), *_predictions(10, first=20)])
    sync = RecordSync(fresh, 50, 2)
    agent = start_session(identity, heartbeat_interval_s=0.1, sync=sync)
    try:
        wait_for(lambda: fresh.acked >= 31 and fresh.stats().depth == 0)
    finally:
        agent.stop()
        fresh.close()
    assert stored_sequences(store, device_id) == list(range(1, 32))
    (alert,) = store.list_alerts(AlertFilter(device_id=device_id))
    assert alert.state is AlertState.FIRING and alert.asset == "pump-1", alert
