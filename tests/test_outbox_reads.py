"""A read the outbox does outside a transaction (where an acknowledgement's chunk ends, whether
the old alert files were taken over) that fails is a LocalStateError like a failed write,
which the sync and the agent handle as the device's disk. Before, the raw sqlite3.Error
escaped: in the acknowledging task, "Task exception was never retrieved", the failed write
not counted."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import LocalStateError
from edge_agent.outbox import PREDICTION, Outbox

pytestmark = pytest.mark.unit


class FailingSelects:
    """A connection whose SELECTs fail as a failing card's reads do."""

    def __init__(self, real: sqlite3.Connection, failing: str) -> None:
        self.real, self.failing = real, failing

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing in sql:
            raise sqlite3.OperationalError("disk I/O error")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_failed_read_in_an_acknowledgement_is_a_local_state_error(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    box.append([(PREDICTION, b"p")] * 10)
    real = box._db
    assert real is not None
    box._db = FailingSelects(real, "SELECT seq, LENGTH(body)")  # type: ignore[assignment]
    with pytest.raises(LocalStateError, match="cannot be read: disk I/O error"):
        box.ack(5)
    box._db = real
    assert box.ack(5) == 5  # nothing lost, done once it can be read
    assert [s for s, _, _ in box.pending(0, 100)] == [6, 7, 8, 9, 10]
    box.close()


def test_a_failed_read_when_taking_the_alert_files_over_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    real = box._db
    assert real is not None
    box._db = FailingSelects(real, "FROM meta")  # type: ignore[assignment]
    box.adopt_open_alerts(tmp_path / "alerts")  # does not raise
    box._db = real
    assert "cannot be read" in caplog.text
    box.close()
