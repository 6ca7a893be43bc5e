"""Bounded work per message: readings spread thinly over hours (what one large message can
carry) are not turned into a row and a window for every slot between them; a clock that
steps back restarts the stream instead of dropping its readings as late for an hour."""

from __future__ import annotations

import itertools
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


def test_a_sensor_clock_stepping_back_restarts_the_stream_instead_of_dropping_an_hour(
    tmp_path: Path,
) -> None:
    bundle, key = train_small(tmp_path / "model")
    site = Site(site_config(tmp_path, bundle), bundle, key.public_key(), tmp_path / "run")
    try:
        site.feed(pump(300, faulty=False, seed=1), 0)
        before = site.jobs
        runner = site.runtime.runners[0]
        # One message a second of this device's time (a call per drain). These readings skip
        # the decoder, so its stream clock does not follow the step: what restarts the stream
        # is a window of this device's time without a reading added.
        ticks = itertools.count()
        runner.clock = lambda: float(next(ticks))
        # The pump's clock steps back an hour: every reading lands behind closed slots.
        site.feed(pump(200, faulty=False, seed=2), 300 - 3600)
        assert runner.clock_steps == 1
        late_rows = runner.carried["late"] // 4  # 4 sensors
        assert late_rows <= runner.length + 2, late_rows  # a window of messages, not an hour
        assert site.jobs - before > 150, site.jobs - before  # scoring goes on
        health = site.runtime.health(disk_free=0)
        assert health.dropped_by_reason["late"] == runner.carried["late"]
    finally:
        site.stop()
