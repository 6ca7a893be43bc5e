"""The alerts an older agent kept open as `alerts/<asset>.json` are taken over by the outbox
once, and a take-over that fails (a full disk at that moment) is done by the next write that
commits. Before, the files stayed to be read again at the next start: an alert cleared in
between came back open after it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.errors import LocalStateError
from edge_agent.outbox import ALERT, PREDICTION, Outbox

pytestmark = pytest.mark.unit


def legacy_file(alerts: Path, asset: str) -> None:
    event = AlertEvent(RAISED, "k-" + asset, asset, 0.9, (("s", 1.0),), 0.0, 10.0, 10.0, "v1")
    alerts.mkdir(exist_ok=True)
    (alerts / f"{asset}.json").write_text(json.dumps(dataclasses.asdict(event)))


def failed_take_over(box: Outbox, alerts: Path) -> None:
    real: Callable[..., None] = box._transaction

    def failing(body: Callable[..., None], what: str) -> None:
        if what == "take the open alerts":
            raise LocalStateError("the disk is full (stand-in)")
        real(body, what)

    box._transaction = failing  # type: ignore[method-assign]
    box.adopt_open_alerts(alerts)
    box._transaction = real  # type: ignore[method-assign]


def test_an_alert_cleared_after_a_failed_take_over_stays_cleared(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    legacy_file(alerts, "pump-1")
    legacy_file(alerts, "pump-2")
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    failed_take_over(box, alerts)
    assert sorted(box.open_alert_events()) == ["pump-1", "pump-2"]
    box.append([(ALERT, b"clear k-pump-1")], None, {"pump-1": None})
    assert sorted(box.open_alert_events()) == ["pump-2"]
    assert not list(alerts.glob("*.json")), "taken over with the write: the files go"
    box.close()
    again = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    again.adopt_open_alerts(alerts)
    assert sorted(again.open_alert_events()) == ["pump-2"]
    again.close()


def test_an_acknowledgement_takes_the_alerts_over_too(tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    legacy_file(alerts, "pump-1")
    box = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    box.append([(PREDICTION, b"p")])
    failed_take_over(box, alerts)
    box.ack(1)
    assert not (alerts / "pump-1.json").exists()
    box.close()
    again = Outbox(tmp_path / "outbox.sqlite3", 256 << 20, ballast_bytes=0)
    assert list(again.open_alert_events()) == ["pump-1"]
    again.close()
