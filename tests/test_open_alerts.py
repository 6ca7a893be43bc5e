"""An alert open when the agent restarts is cleared afterwards under the same key, and a fault
still running at the restart is not raised a second time (the open alert is kept on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.decisions import CLEARED, RAISED
from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    assert (tmp_path / "agent/alerts/pump-1.json").exists()

    # Restarted while the fault still runs, then the pump recovers.
    second = Site(config, bundle, key.public_key(), tmp_path / "2")
    second.feed(pump(100, faulty=True, seed=3), 400)
    assert second.events() == [], "the open alert must not be raised a second time"
    second.feed(pump(200, faulty=False, seed=4), 500)
    cleared = second.events()
    second.stop()
    assert [e.kind for e in cleared] == [CLEARED], cleared
    assert cleared[0].key == raised[0].key and cleared[0].raised_at == raised[0].raised_at
    assert not (tmp_path / "agent/alerts/pump-1.json").exists()
