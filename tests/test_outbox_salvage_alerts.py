"""A damaged outbox whose records cannot all be read: the alerts it says are open are kept
open in the new one only when their raise was read, or was written before a record read (so
at or before the acknowledged mark: the plane has it). Before, every open alert was kept,
and one raised by a record lost with the damage stayed open on site while the plane never
got it."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent import outbox_salvage
from edge_agent.decisions import RAISED, AlertEvent, Verdict
from edge_agent.open_alerts import encode_alert
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from edge_agent.wire import alert_record, prediction_record

T = 1_790_000_000.0
MIB = 1 << 20


def _raise(asset: str, end: float) -> AlertEvent:
    return AlertEvent(RAISED, f"{asset}-k", asset, 0.9, (("temp", 0.8),), end - 10, end, end, "1")


def _prediction(asset: str, end: float, pad: int = 0) -> tuple[int, bytes]:
    verdict = Verdict(asset, 0.5, 0.5, False, {"s" * pad: 1.0} if pad else {}, end - 10, end, None)
    return (PREDICTION, prediction_record(verdict, "1"))


def _damage_last_overflow(path: Path) -> None:
    """The first overflow page of the one large record points past the file: reading that
    record fails, and the scan stops there."""
    with sqlite3.connect(path) as db:
        pages = [
            p
            for (p,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'overflow' "
                "ORDER BY pageno"
            )
        ]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((pages[0] - 1) * size)
        f.write((0x7FFFFFF0).to_bytes(4, "big") + b"\xa5" * 64)


@pytest.mark.unit
def test_an_alert_whose_raise_was_lost_with_the_damage_is_not_kept_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Records are read one at a time (a batch with an unreadable one is lost whole, and
    # sqlite3 steps a row ahead): 2 and 3 are read, 4, 5 (damaged) and 6 are not.
    monkeypatch.setattr(outbox_salvage, "_ROWS", 1)
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 64 * MIB, ballast_bytes=0)
    before, read, lost = _raise("pump-0", T), _raise("pump-1", T + 10), _raise("pump-2", T + 20)
    box.append([(ALERT, alert_record(before))], open_alerts={"pump-0": encode_alert(before)})
    box.ack(1)  # the plane has pump-0's raise
    box.append([_prediction("pump-0", T + 5)])  # 2: decided after it
    box.append([(ALERT, alert_record(read))], open_alerts={"pump-1": encode_alert(read)})  # 3
    box.append([_prediction("pump-3", T + 12)])  # 4
    box.append([_prediction("pump-3", T + 15, pad=9000)])  # 5: unreadable (its overflow pages)
    box.append([(ALERT, alert_record(lost))], open_alerts={"pump-2": encode_alert(lost)})  # 6
    box.close()
    _damage_last_overflow(path)

    caplog.set_level(logging.WARNING, "edge_agent.outbox_salvage")
    again = Outbox(path, 64 * MIB, ballast_bytes=0)
    assert [seq for seq, _, _ in again.pending(0, 10)] == [2, 3], "not the damage meant"
    assert set(again.open_alert_events()) == {"pump-0", "pump-1"}
    warnings = [r.getMessage() for r in caplog.records if "not kept open" in r.getMessage()]
    assert len(warnings) == 1 and "pump-2-k" in warnings[0], warnings
    assert again.stats().next_sequence == 7
    again.close()
