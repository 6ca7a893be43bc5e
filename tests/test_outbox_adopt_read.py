"""When whether the old alert files were taken over cannot be read (a failing card), their
alerts count as open from then on and the next write that commits takes them over, as after
a failed take-over write. Before, they were neither open nor pending: this run raised them a
second time. A file left behind after an earlier take-over is deleted by that write, not
taken over again."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import ALERT, PREDICTION, Outbox
from tests.test_outbox_adopt import legacy_file

pytestmark = pytest.mark.unit


class FailingMetaReads:
    """A connection whose reads of the meta table fail as a failing card's do."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real

    def execute(self, sql: str, *args: Any) -> Any:
        if "FROM meta" in sql:
            raise sqlite3.OperationalError("disk I/O error")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def adopt_failing_read(box: Outbox, alerts: Path) -> None:
    real = box._db
    assert real is not None
    box._db = FailingMetaReads(real)  # type: ignore[assignment]
    box.adopt_open_alerts(alerts)  # logged, does not raise
    box._db = real


def test_alerts_whose_take_over_cannot_be_read_stay_open_and_are_taken_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = tmp_path / "alerts"
    legacy_file(alerts, "pump-1")
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    adopt_failing_read(box, alerts)
    assert "cannot be read" in caplog.text
    assert list(box.open_alert_events()) == ["pump-1"], "open: not raised a second time"
    box.append([(PREDICTION, b"p")])
    assert not list(alerts.glob("*.json")), "taken over with the write: the files go"
    box.close()
    again = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    again.adopt_open_alerts(alerts)
    assert list(again.open_alert_events()) == ["pump-1"]
    again.close()


def test_a_file_left_behind_is_not_taken_over_again_when_the_read_fails(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    legacy_file(alerts, "pump-1")
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    box.adopt_open_alerts(alerts)
    box.append([(ALERT, b"clear k-pump-1")], None, {"pump-1": None})
    box.close()
    legacy_file(alerts, "pump-1")  # deleting it failed
    again = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    adopt_failing_read(again, alerts)
    again.append([(PREDICTION, b"p")])
    assert again.open_alert_events() == {}, "cleared before: stays cleared"
    assert not list(alerts.glob("*.json"))
    again.close()
    third = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    assert third.open_alert_events() == {}
    third.close()
