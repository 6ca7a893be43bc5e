"""An alert open when the agent restarts is cleared afterwards under the same key, and a fault
still running at the restart is not raised a second time (the open alert is kept in the
outbox, with its event; one an older agent kept as `alerts/<asset>.json` is taken over)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from edge_agent.decisions import CLEARED, RAISED, AlertEvent
from edge_agent.outbox import Outbox
from edge_agent.outbox_files import MIGRATED
from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _legacy_file(alerts: Path, event: AlertEvent) -> None:
    """The open alert as an older agent kept it: `alerts/<asset>.json`."""
    alerts.mkdir(exist_ok=True)
    (alerts / f"{event.asset}.json").write_text(json.dumps(dataclasses.asdict(event)))


def test_an_alert_open_at_restart_is_cleared_afterwards_and_not_raised_twice(
    tmp_path: Path,
) -> None:
    bundle, key = train_small(tmp_path / "model")
    # The small test model scores normal rows at 0.8-0.9 of its threshold (a SKAB model: 0.36
    # median), so the site clears below 0.95: this test is about the restart, not the band.
    config = site_config(tmp_path, bundle, decisions={"clear_at": 0.95})
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(pump(200, faulty=False, seed=1), 0)
    first.feed(pump(150, faulty=True, seed=2), 200)
    raised = first.events()
    assert [e.kind for e in raised] == [RAISED], raised
    first.stop()
    assert list(Outbox(config.state_dir / "outbox.sqlite3", 1 << 24).open_alert_events()) == [
        "pump-1"
    ]

    # Restarted while the fault still runs, then the pump recovers.
    second = Site(config, bundle, key.public_key(), tmp_path / "2")
    second.feed(pump(100, faulty=True, seed=3), 400)
    assert second.events() == [], "the open alert must not be raised a second time"
    second.feed(pump(200, faulty=False, seed=4), 500)
    cleared = second.events()
    second.stop()
    assert [e.kind for e in cleared] == [CLEARED], cleared
    assert cleared[0].key == raised[0].key and cleared[0].raised_at == raised[0].raised_at
    assert Outbox(config.state_dir / "outbox.sqlite3", 1 << 24).open_alert_events() == {}
    assert not (tmp_path / "agent/alerts/pump-1.json").exists()


def test_an_alert_an_older_agent_kept_as_a_file_is_taken_over_once(tmp_path: Path) -> None:
    """An older agent kept the open alert in alerts/<asset>.json: the outbox takes it over at
    the first start (the file goes), and it is cleared under its key."""
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle, decisions={"clear_at": 0.95})
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(pump(200, faulty=False, seed=1), 0)
    first.feed(pump(150, faulty=True, seed=2), 200)
    (raised,) = first.events()
    first.stop()
    # As an older agent left it: the file, and an outbox that knows of no open alert.
    with sqlite3.connect(config.state_dir / "outbox.sqlite3") as db:
        db.execute("DROP TABLE open_alerts")
        db.execute("DELETE FROM meta WHERE key = ?", (MIGRATED,))
    alerts = config.state_dir / "alerts"
    _legacy_file(alerts, raised)

    second = Site(config, bundle, key.public_key(), tmp_path / "2")
    assert not (alerts / "pump-1.json").exists()
    assert list(second.outbox.open_alert_events()) == ["pump-1"]
    second.feed(pump(200, faulty=False, seed=4), 500)
    (cleared,) = second.events()
    second.stop()
    assert (cleared.kind, cleared.key) == (CLEARED, raised.key)
    # A file left behind (deleting it failed) is not taken over a second time.
    _legacy_file(alerts, raised)
    third = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
    third.adopt_open_alerts(alerts)
    assert third.open_alert_events() == {}
    third.close()
