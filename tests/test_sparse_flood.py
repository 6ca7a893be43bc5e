"""Bounded work per message: readings spread thinly over hours (what one large message can
carry) are not turned into a scored window for every slot between them."""

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
        # 360 readings a minute apart: six hours of slots, each window nearly empty.
        site.feed(pump(360, faulty=False, seed=2), 300, step=60.0)
        extra = site.jobs - dense
        sparse = site.runtime.runners[0].sparse_windows
        assert extra < 100, f"{extra} windows scored for 360 sparse readings"
        assert sparse > 20_000, sparse
        health = site.runtime.health(disk_free=0)
        assert health.dropped_by_reason["sparse_window"] == sparse
    finally:
        site.stop()
