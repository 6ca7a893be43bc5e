"""`autoglm alerts show` on an alert whose times sit at the ends of the calendar (a device's
times, stored before the control plane bounded them): it prints the alert, never an
OverflowError from moving a time past year 1 or year 9999."""

from __future__ import annotations

import argparse
import datetime as dt

import pytest

from cloud.cli.alert_cmds import cmd_show
from cloud.domain import AlertEventRecord, AlertFilter
from tests.conftest import register
from tests.support.cloud import RunningPlane
from tests.support.stores import NOW

pytestmark = pytest.mark.integration
EARLIEST = dt.datetime(1, 1, 1, 0, 0, 20, tzinfo=dt.UTC)
LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


def _event(device: str, seq: int, kind: str, asset: str, at: dt.datetime) -> AlertEventRecord:
    return AlertEventRecord(
        device, seq, f"{asset}-1", kind, asset, "f", 2.0, [("s", 1.0)], at, at, at, "1"
    )


def test_show_an_alert_at_the_calendars_ends(
    plane: RunningPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: first seen 0001-01-01 (the timeline starts 5 min earlier) or resolved at
    9999-12-31 (it ends 5 min later) ended the command with an uncaught OverflowError."""
    register(plane, "edge-1")
    store = plane.plane.store
    device = store.get_device("edge-1").id
    store.store_records(
        device,
        [],
        [
            _event(device, 1, "raised", "early", EARLIEST),
            _event(device, 2, "raised", "late", NOW),
            _event(device, 3, "cleared", "late", LATEST),
        ],
        NOW,
    )
    alerts = {a.asset: a for a in store.list_alerts(AlertFilter(), 10)}
    assert alerts["early"].first_seen == EARLIEST and alerts["late"].resolved_at == LATEST
    with plane.client() as client:
        for asset in ("early", "late"):
            shown = cmd_show(argparse.Namespace(id=alerts[asset].id, json=False), client)
            out = capsys.readouterr().out
            assert shown == 0 and f"asset {asset}" in out, out
