"""An uncalibrated asset whose calibration fails (a dead sensor) tries again after more and
more rows (calibration_rows, then doubling from the second failure, up to
2**CAL_RETRY_DOUBLINGS times) and says so now and then, not on every try; its rows are
collected a block at a time, trying on exactly the rows one at a time would. A sensor that
comes back calibrates within the longest wait. Counted, not timed: the runner's clock is
frozen. The last test runs the real runtime (its calibration and inference thread)."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.asset_stream import CAL_RETRY_DOUBLINGS, AssetRunner
from edge_agent.ingest.stream import ClosedRows
from edge_agent.windowing import AlignedSeries, WindowSpec
from tests.support.bundles import train_small
from tests.support.datapath import START, Site, site_config

SENSORS = 4
ROWS = 120  # calibration_rows
SPEC = WindowSpec(length=24, stride=2, period_s=1.0, max_staleness_s=3.0)
FAILED = "the calibration of pump-1 failed"


def runner() -> AssetRunner:
    model: Any = types.SimpleNamespace(
        spec=SPEC,
        schema=types.SimpleNamespace(size=SENSORS),
        manifest=types.SimpleNamespace(calibration_rows=ROWS),
        frame=types.SimpleNamespace(
            net_center=np.zeros(SENSORS, np.float32), net_scale=np.ones(SENSORS, np.float32)
        ),
    )
    made = AssetRunner(0, "pump-1", model, lateness_s=2.0, history_rows=0)
    made.clock = lambda: 0.0  # frozen: what is said depends on counts alone
    return made


def rows(first: int, count: int, dead: bool = True, seed: int = 0) -> ClosedRows:
    values = np.random.default_rng(seed).standard_normal((count, SENSORS)).astype(np.float32)
    mask = np.ones((count, SENSORS), np.float32)
    if dead:
        mask[:, 3] = 0.0  # sensor 3 never reports
    return ClosedRows(first, values, mask, gap=False)


class Calibrations:
    """start_calibration as the runtime's: calibrates when every sensor has readings, else
    fails and tells the runner why."""

    def __init__(self) -> None:
        self.tries: list[AlignedSeries] = []

    def __call__(self, runner: AssetRunner, series: AlignedSeries) -> None:
        self.tries.append(series)
        if series.mask.sum(axis=0).min() < 2:
            runner.calibration_not_done("failed (sensor 3 has 0 valid readings)", tried=True)
            return
        runner.calibration = types.SimpleNamespace(  # type: ignore[assignment]
            input_center=np.zeros(SENSORS, np.float32), input_scale=np.ones(SENSORS, np.float32)
        )


def feed(asset: AssetRunner, closed: ClosedRows, calibrations: Calibrations) -> int:
    """Windows cut."""
    cut = [0]
    asset.feed(closed, lambda b: cut.__setitem__(0, cut[0] + len(b)), calibrations)
    return cut[0]


@pytest.mark.unit
def test_a_dead_sensor_backs_off_and_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "edge_agent.asset_stream")
    asset, calibrations = runner(), Calibrations()
    week = 7 * 86400
    for first in range(0, week, 3600):  # a 7-day backlog, an hour a message
        feed(asset, rows(first, 3600, seed=first), calibrations)
    # Tries at rows 120, 240, 480, ..., 7680, then every 3840 (32 x 120): 162 of them; before,
    # one every 120 rows: 5,040.
    assert len(calibrations.tries) == 162, len(calibrations.tries)
    assert all(s.slots == ROWS for s in calibrations.tries)
    ends = [s.start + ROWS for s in calibrations.tries]
    assert ends[:8] == [120, 240, 480, 960, 1920, 3840, 7680, 11520], ends[:8]
    said = [r.getMessage() for r in caplog.records if FAILED in r.getMessage()]
    assert len(said) == 1, said  # the clock is frozen: said once, not on every try
    assert "sensor 3 has 0 valid readings" in said[0] and "next comes after 120 more" in said[0]


@pytest.mark.unit
def test_a_sensor_back_calibrates_within_the_longest_wait() -> None:
    asset, calibrations = runner(), Calibrations()
    feed(asset, rows(0, 50_000), calibrations)
    tried = len(calibrations.tries)
    longest = ROWS << CAL_RETRY_DOUBLINGS
    cut = feed(asset, rows(50_000, longest + ROWS, dead=False), calibrations)
    assert asset.calibration is not None
    assert len(calibrations.tries) == tried + 1, len(calibrations.tries) - tried
    assert cut > 0  # the rows after the calibration's are windowed in the same feed
    assert asset.cal_rows.due == ROWS and asset.cal_rows.failures == 0


@pytest.mark.unit
@pytest.mark.parametrize("block", [7, 500, 10_000])
def test_blocks_collect_exactly_what_rows_one_at_a_time_do(block: int) -> None:
    single, by_row = runner(), Calibrations()
    batched, by_block = runner(), Calibrations()
    closed = rows(1000, 12_000, seed=3)
    for size, asset, calibrations in ((1, single, by_row), (block, batched, by_block)):
        for a in range(0, closed.values.shape[0], size):
            b = slice(a, a + size)
            part = ClosedRows(1000 + a, closed.values[b], closed.mask[b], False)
            feed(asset, part, calibrations)
    assert len(by_row.tries) == len(by_block.tries) > 5
    for one, other in zip(by_row.tries, by_block.tries, strict=True):
        assert one.start == other.start
        np.testing.assert_array_equal(one.values, other.values)
        np.testing.assert_array_equal(one.mask, other.mask)
    np.testing.assert_array_equal(single.ring_v, batched.ring_v)
    np.testing.assert_array_equal(single.ring_m, batched.ring_m)
    assert (single.filled, single.valid_cells) == (batched.filled, batched.valid_cells)
    assert single.valid_cells == 3 * SPEC.length  # sensor 3 dead: 3 of 4 in every row


@pytest.mark.unit
def test_one_not_started_is_no_failure_and_each_kind_is_said_when_it_first_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "edge_agent.asset_stream")
    asset, tries = runner(), [0]

    def stuck(r: AssetRunner, series: AlignedSeries) -> None:
        tries[0] += 1
        r.calibration_not_done("is not started: 1 given up is still pending", tried=False)

    for k in range(10):
        asset.feed(rows(k * ROWS, ROWS), lambda _: None, stuck)
    assert tries[0] == 10  # every calibration_rows: the backoff is for failures
    asset.feed(rows(10 * ROWS, ROWS), lambda _: None, Calibrations())
    assert asset.cal_rows.due == ROWS  # the first failure: as many rows again
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "is not started" in said[0] and FAILED in said[1]


@pytest.mark.unit
def test_the_calibration_rows_are_kept_across_a_restart() -> None:
    asset, calibrations = runner(), Calibrations()
    feed(asset, rows(500, 50, dead=False), calibrations)
    state = asset.snapshot()
    again = runner()
    again.restore(state)
    np.testing.assert_array_equal(again.cal_rows.values, asset.cal_rows.values)
    assert again.cal_rows.first_slot == 500
    feed(again, rows(550, ROWS - 51, dead=False), calibrations)
    assert not calibrations.tries
    feed(again, rows(550 + ROWS - 51, 1, dead=False), calibrations)  # its 120th row
    assert len(calibrations.tries) == 1 and calibrations.tries[0].start == 500


@pytest.mark.integration
@pytest.mark.slow
def test_the_runtime_tries_a_dead_sensor_asset_with_backoff_and_says_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    bundle, key = train_small(tmp_path / "model")
    site = Site(site_config(tmp_path, bundle), bundle, key.public_key(), tmp_path / "run")
    try:
        runtime = site.runtime
        asset = runtime.runners[0]
        asset.clock = lambda: 0.0
        calls = [0]

        def counted(r: AssetRunner, series: AlignedSeries) -> None:
            calls[0] += 1
            runtime.start_calibration(r, series)

        def backlog(first: int, count: int, sensors: int) -> None:
            ts = START + first + np.arange(count, dtype=np.float64)
            for j in range(sensors):
                values = np.random.default_rng(j).standard_normal(count) * 0.1 + 1.0 + j
                asset.aligner.add_many(j, ts, values)
            while (closed := asset.aligner.close_ready()) is not None:
                asset.feed(closed, runtime.pipeline.emit, counted)

        backlog(0, 20_000, sensors=3)  # sensor 3 is dead
        # Tries at rows 120, 240, 480, 960, 1920, 3840, 7680, 11520, 15360, 19200; before,
        # one (and a warning) every 120 rows: 166.
        assert calls[0] == 10, calls[0]
        assert asset.calibration is None
        said = [r.getMessage() for r in caplog.records if FAILED in r.getMessage()]
        assert len(said) == 1, said
        assert "sensor 3" in said[0], said[0]
        backlog(20_000, 4000, sensors=4)  # it is back
        assert asset.calibration is not None
        assert calls[0] == 11, calls[0]
    finally:
        site.stop()
