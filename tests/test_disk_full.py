"""A full disk loses nothing silently: the outbox reports the real cause and stays whole, the
data path goes on alerting on site, and the lost records are counted in the heartbeat.

The full disk is a stand-in (`DiskFullConnection`, `calibration_save_fails`): SQLite's own
"database or disk is full" at COMMIT and ENOSPC from the calibration write, injected where
the real ones arise; mounting a small file system needs privileges CI may not have."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.calibration_store import CalibrationStore
from edge_agent.decisions import RAISED
from edge_agent.errors import LocalStateError
from edge_agent.outbox import ALERT, PREDICTION, Outbox
from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class DiskFullConnection:
    """Stand-in for a full disk: COMMIT fails as SQLite fails then, ending the transaction."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self.real.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class FullAtWrite(DiskFullConnection):
    """A full disk found at the first statement that writes (the WAL must grow), not only at
    COMMIT."""

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.lstrip().split(" ", 1)[0] in ("INSERT", "DELETE", "UPDATE"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


def test_the_outbox_reports_a_full_disk_and_stays_whole(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 20)
    assert box.append([(PREDICTION, b"a")]) == [1]
    real = box._db
    box._db = DiskFullConnection(real)  # type: ignore[assignment]
    with pytest.raises(LocalStateError, match="disk is full"):
        box.append([(ALERT, b"b"), (PREDICTION, b"c")])
    box._db = real
    assert box.stats().depth == 1 and box.stats().next_sequence == 2
    assert box.append([(ALERT, b"d")]) == [2]  # space again: numbering goes on, no gap
    box.close()


def test_numbers_the_plane_knows_are_not_reused_after_an_ack_that_could_not_be_written(
    tmp_path: Path,
) -> None:
    """An outbox behind the control plane (a state directory restored from a backup) learns
    its position from an acknowledgement. When that cannot be written, the next append must
    still number past it: the acknowledgement, written later, would delete those records
    unsent. A failure at COMMIT kept the number; one at an earlier statement did not."""
    box = Outbox(tmp_path / "outbox.sqlite3", 1 << 20)
    assert box.append([(PREDICTION, b"a"), (PREDICTION, b"b")]) == [1, 2]
    real = box._db
    box._db = FullAtWrite(real)  # type: ignore[assignment]
    with pytest.raises(LocalStateError, match="disk is full"):
        box.ack(50)
    box._db = real
    assert box.stats().depth == 2 and box.acked == 0
    assert box.append([(PREDICTION, b"c")]) == [51]
    assert box.ack(50) == 2
    assert [seq for seq, _, _ in box.pending(0, 10)] == [51]
    box.close()


def test_a_full_disk_still_alerts_on_site_and_counts_what_it_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle, outbox={"prediction_every": 1})

    def calibration_save_fails(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CalibrationStore, "save", calibration_save_fails)
    site = Site(config, bundle, key.public_key(), tmp_path / "run")
    real = site.outbox._db
    site.outbox._db = DiskFullConnection(real)  # type: ignore[assignment]
    try:
        site.feed(pump(200, faulty=False, seed=1), 0)
        site.feed(pump(150, faulty=True, seed=2), 200)
        assert [e.kind for e in site.events()] == [RAISED], site.events()
        lost = site.runtime.counters.outbox_write_failed
        # Every prediction and window capture is counted lost; the alert event waits in
        # memory, not lost.
        captures = sum(site.runtime.capture.captured.values())
        assert lost == site.runtime.counters.predictions_kept + captures, lost
        health = site.runtime.health(disk_free=0)
        assert health.dropped_by_reason["outbox_write_failed"] == lost
        # The heartbeat says when: one stretch, still going on.
        (stretch,) = health.lost_records
        assert stretch.records == lost and stretch.ongoing, stretch
        assert stretch.first.seconds <= stretch.last.seconds
        assert site.outbox.stats().depth == 0
        # Space again: the waiting alert event is written first, then the new records.
        site.outbox._db = real
        site.feed(pump(30, faulty=True, seed=3), 350)
        kinds = [kind for _, kind, _ in site.outbox.pending(0, 10_000)]
        assert kinds[0] == ALERT and kinds.count(ALERT) == 1, kinds[:5]
        (closed,) = site.runtime.health(disk_free=0).lost_records
        assert closed.records == lost and not closed.ongoing, closed
    finally:
        site.stop()
