"""Batched messages (many rows of every sensor at once) take the vectorised path through the
aligner and the window cutting; they must score exactly the windows, with exactly the scores
and masks, that the same readings sent one by one score."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.batching import WindowBatch
from edge_agent.pipeline import CATCH_UP_FROM
from tests.support.agents import wait_for
from tests.support.datapath import START, Site, pump, site_config

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("rows_per_message", [7, 96, 500])
def test_batched_readings_score_what_single_readings_score(
    tmp_path: Path, rows_per_message: int, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    bundle, key = trained
    rows = np.concatenate([pump(260, faulty=False, seed=1), pump(140, faulty=True, seed=2)])
    rows[rows.shape[0] // 2 :: 17, 1] = np.nan  # missing readings of one sensor
    one = Site(site_config(tmp_path / "a", bundle), bundle, key.public_key(), tmp_path / "a")
    one.feed(rows, 0)
    block = Site(site_config(tmp_path / "b", bundle), bundle, key.public_key(), tmp_path / "b")
    block.feed_block(rows, 0, rows_per_message)
    for site in (one, block):
        site.stop()
    assert len(one.verdicts) > 100, len(one.verdicts)
    assert [v.window_end for v in block.verdicts] == [v.window_end for v in one.verdicts]
    np.testing.assert_allclose(
        [v.score for v in block.verdicts], [v.score for v in one.verdicts], atol=1e-5
    )
    assert [e.kind for e in block.events()] == [e.kind for e in one.events()]


def test_behind_inference_scores_every_kth_window_and_says_so(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    """A backlog far bigger than inference keeps up with (here: inference held while 2,000
    rows arrive) is thinned, not queued without bound, and the skipped windows are counted."""
    bundle, key = trained
    config = site_config(tmp_path, bundle)
    site = Site(config, bundle, key.public_key(), tmp_path / "run")
    try:
        site.feed(pump(200, faulty=False, seed=1), 0)  # calibrated, scoring
        runtime = site.runtime
        assert runtime.worker is not None
        held = threading.Event()
        runtime.worker.submit(lambda _backend: held.wait(60))  # inference busy
        scored_before, cut = len(site.verdicts), 0

        def emit(batch: WindowBatch) -> None:
            nonlocal cut
            cut += len(batch)
            runtime.pipeline.emit(batch)

        runner = runtime.runners[0]
        rows = pump(2000, faulty=False, seed=2)
        ts = START + 200 + np.arange(rows.shape[0], dtype=np.float64)
        for j in range(rows.shape[1]):
            runner.aligner.add_many(j, ts, rows[:, j].astype(np.float64))
        while (closed := runner.aligner.close_ready()) is not None:
            runner.feed(closed, emit, runtime.start_calibration)
        skipped = runtime.counters.behind_skipped
        held.set()
        wait_for(lambda: len(site.verdicts) - scored_before == cut - skipped, timeout=60)
        waiting_bound = CATCH_UP_FROM * config.batching.max_batch
        assert skipped > 0 and cut - skipped < cut, (cut, skipped)
        # Thinned from the moment the bound was reached: far fewer queued than cut.
        assert cut - skipped <= waiting_bound + (cut - waiting_bound) // 2 + 1, (cut, skipped)
        health = runtime.health(disk_free=0)
        assert health.dropped_by_reason["behind_skipped"] == skipped
    finally:
        site.stop()


def test_an_asset_whose_rows_fail_restarts_its_stream_and_the_pipeline_thread_lives_on(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything raised while an asset's closed rows are fed on (once a hostile timestamp
    overflowed the grid's slot numbers there) used to end the pipeline thread, and with it
    scoring for every asset. Now it is counted, that asset's stream starts afresh, and the
    readings after it are scored."""
    bundle, key = trained
    site = Site(site_config(tmp_path, bundle), bundle, key.public_key(), tmp_path / "run")
    runtime = site.runtime
    try:
        site.feed(pump(200, faulty=False, seed=1), 0)  # calibrated, scoring
        runner = runtime.runners[0]
        feed, failures = runner.feed, []

        def fails_once(*args: object, **kwargs: object) -> None:
            if not failures:
                failures.append(1)
                raise OverflowError("Python int too large to convert to C long")
            feed(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(runner, "feed", fails_once)
        runtime.pipeline.start()
        errors = runtime.counters.errors
        rows = pump(300, faulty=False, seed=2)

        def put(first: int, last: int) -> None:
            for i in range(first, last):
                for j in range(rows.shape[1]):
                    runtime.pipeline.queue.put((0, j, START + 200 + i, float(rows[i, j])))

        put(0, 20)  # what the failure loses: the rows it was feeding and the open slots
        wait_for(lambda: runtime.counters.errors > errors, timeout=120)
        assert runtime.pipeline.running
        scored = len(site.verdicts)
        put(20, 300)
        wait_for(lambda: len(site.verdicts) > scored, timeout=120)
        assert failures and runtime.counters.errors == errors + 1, runtime.counters.errors
        assert runtime.pipeline.running
    finally:
        runtime.pipeline.stop()
        site.stop()


def test_a_flood_stamped_ahead_is_trimmed_and_counted_by_the_pipeline(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    """Readings stamped ahead of now wait in the aligner for their time; past the per-sensor
    bound (here 2 x (max_future_s + lateness) / period slots, 600 or so) the newest are
    dropped and counted as backlog_full in health, and what waits stays under the bound."""
    bundle, key = trained
    config = site_config(tmp_path, bundle, ingest={"max_backlog_readings": 100})
    site = Site(config, bundle, key.public_key(), tmp_path / "run")
    runtime = site.runtime
    try:
        runtime.pipeline.start()
        aligner = runtime.runners[0].aligner
        ahead = time.time() + 600.0  # no slot of them closes while the test runs
        for i in range(3000):  # one a slot: trimming cannot merge them
            runtime.pipeline.queue.put((0, 0, ahead + i * aligner.period, 1.0))

        def dropped() -> int:
            return runtime.health(disk_free=0).dropped_by_reason.get("backlog_full", 0)

        wait_for(lambda: dropped() + aligner.pending_readings == 3000)  # all drained
        limit = 2 * int((config.ingest.max_future_s + aligner.lateness) / aligner.period)
        waiting = aligner.pending_readings
        assert 0 < waiting <= limit < 3000, (waiting, limit)
    finally:
        runtime.pipeline.stop()
        site.stop()
