"""Bounded work per message: readings spread thinly over hours (what one large message can
carry) are not turned into a row and a window for every slot between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sparse_readings_over_hours_score_no_masked_windows(tmp_path: Path) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle)
    site = Site(config, bundle, key.public_key(), tmp_path / "run")
    try:
        site.feed(pump(200, faulty=False, seed=1), 0)
        dense = site.jobs
        assert dense > 50  # calibrated and scoring
        # 360 readings a minute apart: six hours of slots. Each minute without a reading is
        # longer than a window: the stream restarts at every reading instead of aligning and
        # windowing the empty slots in between (one row per reading, no window scored).
        runner = site.runtime.runners[0]
        site.feed(pump(360, faulty=False, seed=2), 300, step=60.0)
        extra = site.jobs - dense
        assert extra <= 2, f"{extra} windows scored for 360 sparse readings"  # the dense tail
        assert runner.gaps >= 350, runner.gaps
        assert runner.aligner.counts["gap_slots"] > 20_000
        assert runner.sparse_windows == 0, runner.sparse_windows
    finally:
        site.stop()
