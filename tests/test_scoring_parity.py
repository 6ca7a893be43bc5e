"""The agent's streaming data path scores exactly what `autoglm model predict` scores: the
same readings through the agent's pipeline and inference threads (everything but the MQTT
socket) and through the offline back-test give the same score and decision per window."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.batching import WindowBatch
from edge_agent.config import load_agent_config
from edge_agent.decisions import Verdict
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.scoring import calibrate_and_score, frame_of
from edge_agent.serving import open_serving
from edge_agent.windowing import align_to_grid
from tests.support.agents import wait_for
from tests.support.bundles import OPTIONS, train_small
from tests.support.sensordata import SENSORS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
START = 1_700_000_000.0


@pytest.mark.parametrize("subspace", [False, True], ids=["no-subspace", "defaults"])
def test_agent_and_predict_give_identical_scores_and_decisions(
    tmp_path: Path, subspace: bool
) -> None:
    # the subspace evidence on by default (the small model's sensors: 4), and off
    decision = dataclasses.replace(OPTIONS.decision, subspace=subspace)
    options = dataclasses.replace(OPTIONS, decision=decision)
    bundle, key = train_small(tmp_path / "model", options)
    written = json.loads((bundle / "manifest.json").read_text())["decision"]
    assert written.get("subspace", False) is subspace
    rows = 400
    rng = np.random.default_rng(8)
    t = np.arange(rows)
    load = np.sin(2 * np.pi * t / 40)
    values = np.stack(
        [10 + load, 3 + 0.5 * load, 1 + 0.2 * load, 0.2 + 0.01 * rng.standard_normal(rows)], 1
    ) + 0.05 * rng.standard_normal((rows, 4))
    values[260:330, 0] -= 2.0  # a fault: the flow drops, a level change the model must see
    values[300:340, 3] += 0.2
    times = START + t.astype(np.float64)

    verdicts: list[Verdict] = []

    config = load_agent_config(
        None,
        {
            "state_dir": tmp_path / "agent",
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
        },
    )
    model = open_serving(bundle, key.public_key(), config.model, tmp_path / "m", tmp_path / "e")
    runtime = EdgeRuntime(
        config, model, Outbox(tmp_path / "outbox.db", 1 << 24), "t", verdicts.append
    )
    assert runtime.worker is not None and model.schema.names == SENSORS
    runtime.start_inference()
    emitted = []

    def emit(batch: WindowBatch) -> None:
        emitted.extend(batch.jobs())
        runtime.pipeline.emit(batch)

    try:
        runner = runtime.runners[0]
        for i in range(rows):  # as the pipeline thread does for each decoded reading
            for j in range(len(SENSORS)):
                runner.aligner.add(j, times[i], values[i, j])
            while (closed := runner.aligner.close_ready()) is not None:
                runner.feed(closed, emit, runtime.start_calibration)
        wait_for(lambda: len(verdicts) == len(emitted) > 0, timeout=120)
    finally:
        runtime.stop_inference()
        model.close()

    frame = frame_of(model.manifest)
    period = model.manifest.sampling.period_s
    series = align_to_grid(times, values, period, model.manifest.sampling.max_staleness_s)
    k = model.manifest.calibration_rows
    with_model = open_serving(
        bundle, key.public_key(), config.model, tmp_path / "m2", tmp_path / "e2"
    )
    try:
        offline = calibrate_and_score(with_model.backend, frame, series, k)
    finally:
        with_model.close()
    offline_end = {
        round(series.start + (offline.first_slot + i) * period, 3): (score, flag)
        for i, (score, flag) in enumerate(zip(offline.score, offline.anomaly, strict=True))
    }
    assert (offline.calibration.subspace_basis is not None) is subspace
    assert len(verdicts) >= rows - k - 5, len(verdicts)
    matched = 0
    for verdict in verdicts:
        score, flag = offline_end[round(verdict.window_end, 3)]
        assert verdict.score == pytest.approx(float(score), rel=1e-4, abs=1e-5), verdict
        assert (verdict.score >= 1.0) == bool(flag), verdict
        matched += 1
    flags = [v.score >= 1.0 for v in verdicts]
    assert any(flags) and not all(flags), "the stream must hold normal and faulty windows"
    assert matched == len(verdicts)
