"""A site calibration that does not finish within `decisions.calibration_timeout_s` fails
loudly (log, health) and holds the pipeline only up to that bound: another asset's readings
are aligned while the inference thread is still stuck, and no calibration is queued behind
the stuck one; the late result is discarded and the asset calibrates again on new rows. One
installed just as the bound passes is installed, not counted failed. The inference thread
is stalled for real (a task queued on it that waits), not stubbed."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import load_agent_config
from edge_agent.inference.base import InferenceBackend
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.agents import wait_for
from tests.support.bundles import train_small
from tests.support.datapath import pump

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
T0 = float(int(time.time()) - 3600)


def feed(runtime: EdgeRuntime, asset: int, rows: np.ndarray, first: int) -> None:
    """Readings as the decoder hands them to the pipeline thread."""
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            runtime.pipeline.queue.put((asset, j, T0 + first + i, float(rows[i, j])))


def test_a_calibration_past_its_bound_fails_loudly_and_holds_no_other_asset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = load_agent_config(
        None,
        {
            "state_dir": tmp_path / "agent",
            "assets": [
                {"name": "pump-1", "topics": ["plant/pump-1/+"]},
                {"name": "pump-2", "topics": ["plant/pump-2/+"]},
            ],
            "model": {"bundle": bundle},
            "decisions": {"calibration_timeout_s": 1.0},
        },
    )
    model = open_serving(bundle, key.public_key(), config.model, tmp_path / "m", tmp_path / "e")
    outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
    runtime = EdgeRuntime(config, model, outbox, "t")
    worker = runtime.worker
    assert worker is not None
    runtime.start_inference()
    runtime.pipeline.start()
    stalled, release = threading.Event(), threading.Event()

    def stall(_: InferenceBackend) -> None:
        stalled.set()
        release.wait(120)

    try:
        worker.submit(stall)  # the inference thread is stuck from here
        assert stalled.wait(30)
        rows = pump(400, faulty=False, seed=1)
        caplog.set_level(logging.ERROR, "edge_agent.runtime")
        feed(runtime, 0, rows[:130], 0)  # pump-1 reaches its 120 calibration rows
        counters = runtime.counters
        # The count comes just before the log line (pipeline thread): wait for both.
        failed = "the calibration of pump-1 did not finish within"
        wait_for(lambda: counters.calibration_timeouts == 1 and failed in caplog.text, timeout=60)
        assert failed in caplog.text, caplog.text
        # The pipeline goes on with the other asset while inference is still stuck.
        other = runtime.runners[1]
        feed(runtime, 1, rows[:50], 0)
        wait_for(lambda: other.aligner.readings == 50 * rows.shape[1], timeout=60)
        assert not release.is_set() and worker.running
        health = runtime.health(disk_free=0)
        assert health.dropped_by_reason["calibration_timeout"] == 1
        # Its next 120 rows, inference still stuck: no calibration queued behind the stuck
        # one (the pipeline would wait the bound again, and again).
        caplog.set_level(logging.WARNING, "edge_agent.runtime")
        feed(runtime, 0, rows[130:260], 130)
        wait_for(lambda: "the calibration of pump-1 is not started" in caplog.text, timeout=60)
        assert counters.calibration_timeouts == 1, counters.calibration_timeouts
        release.set()
        runtime.run_on_inference_thread(lambda _: None)  # the late calibration ran: discarded
        first = runtime.runners[0]
        done = threading.Event()
        assert runtime.sink is not None
        runtime.sink.call(done.set)
        assert done.wait(30)
        assert first.calibration is None
        # Its rows are collected again: 120 new ones calibrate it.
        feed(runtime, 0, rows[260:], 260)
        wait_for(lambda: first.calibration is not None, timeout=120)
        assert counters.calibration_timeouts == 1
    finally:
        release.set()
        runtime.pipeline.stop()
        runtime.stop_inference()
        outbox.close()
        model.close()


def test_a_calibration_installed_as_its_bound_passes_is_not_counted_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, key = train_small(tmp_path / "model")
    bound = 15.0  # far above a small calibration even on a loaded machine (it is < 1 s)
    config = load_agent_config(
        None,
        {
            "state_dir": tmp_path / "agent",
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
            "decisions": {"calibration_timeout_s": bound},
        },
    )
    model = open_serving(bundle, key.public_key(), config.model, tmp_path / "m", tmp_path / "e")
    outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
    runtime = EdgeRuntime(config, model, outbox, "t")
    decisions, counters = runtime.decisions, runtime.counters
    assert decisions is not None
    install = decisions.install

    def slow_install(*args: Any) -> None:
        # Inside the install as the bound passes: the pipeline thread's wait ends meanwhile.
        # Before the fix it counted the calibration failed right then (and it was installed).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: counters.calibration_timeouts > 0, timeout=bound + 2)
        install(*args)

    monkeypatch.setattr(decisions, "install", slow_install)
    runtime.start_inference()
    runtime.pipeline.start()
    try:
        rows = pump(150, faulty=False, seed=1)
        feed(runtime, 0, rows[:140], 0)  # its 120 calibration rows and a few
        runner = runtime.runners[0]
        wait_for(lambda: runner.calibration is not None, timeout=120)
        feed(runtime, 0, rows[140:], 140)  # aligned once the pipeline thread is past it
        wait_for(lambda: runner.aligner.readings == rows.size, timeout=60)
        assert counters.calibration_timeouts == 0, counters.calibration_timeouts
    finally:
        runtime.pipeline.stop()
        runtime.stop_inference()
        outbox.close()
        model.close()
