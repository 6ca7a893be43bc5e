"""The learning loop on real parts: a site whose pump has a recurring benign flow dip (a
backflush the model flags) and one real fault, streamed over a real Mosquitto into a real
agent that is restarted halfway, syncing to a real control plane. Every raised alert's
window arrives in the cloud exactly once; an operator marks the dips false alarms and the
fault true; `autoglm data export` writes Parquet with those labels; `autoglm model train
--from-export --base` fine-tunes the pushed model (real torch, one thread) and fits its
decision's per-sensor tolerances to the verdicts, with the site calibration each window was
captured under: the new model scores every exported false-alarm window under 1 and every
fault window at or above 1, and on a replay of the site's stream through the agent's own
scoring and alert logic (`calibrate`, `fault_score`, `AssetDecider`) the dips raise no alert
while the fault still does. (tests/test_learning_rollout.py rolls such a model out to the
agent through a shadow rollout and plays the site again.)"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.captures import CaptureFilter, CaptureRecord
from cloud.cli.main import run as autoglm
from cloud.model.backtest import load_model
from cloud.model.bundle_writer import read_own_bundle
from cloud.model.capture_data import DATA_FILE, SUMMARY_FILE, read_export
from edge_agent.calibration import fault_score, to_network_space
from edge_agent.config import DecisionPolicy
from edge_agent.decisions import RAISED, AssetDecider
from edge_agent.scoring import calibrate, window_outputs
from edge_agent.simulate import Stream
from edge_agent.windowing import align_to_grid
from tests.support.agents import start_agent, wait_for
from tests.support.broker import Broker
from tests.support.cloud import RunningPlane
from tests.support.learning_site import (
    CALIBRATION,
    ROWS,
    Publisher,
    cli_connection,
    fine_tune,
    fleet_bundle,
    give_verdicts,
    site_config,
    site_stream,
    stream_part,
    where,
)
from tests.support.records import box_sequences, stored_sequences
from tests.support.sensordata import SENSORS

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
RESTART_AT = 400


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    p = Publisher(broker)
    yield p
    p.close()


def export_scores(
    bundle: Path, key: ed25519.Ed25519PublicKey, export: Path, stream: Stream
) -> np.ndarray:
    """The scores a model gives the exported windows, calibrated on the site's first
    CALIBRATION rows as an agent serving it would be (unsmoothed window scores)."""
    windows = read_export(export)
    with load_model(bundle, key, threads=1) as loaded:
        series = align_to_grid(stream.offsets, stream.values, 1.0, 2.0)
        cal, _, _, _ = calibrate(loaded.model, loaded.frame, series, CALIBRATION)
        raw = np.nan_to_num(windows.values)
        x = to_network_space(
            raw, cal.input_center, cal.input_scale, loaded.frame.net_center, loaded.frame.net_scale
        )
        outputs = window_outputs(loaded.model, loaded.frame, x, windows.mask)
        return fault_score(outputs, cal, loaded.frame.decision)


def replay_raises(bundle: Path, key: ed25519.Ed25519PublicKey, stream: Stream) -> list[int]:
    """The rows at which an agent serving `bundle` from the stream's start raises alerts:
    calibrated on the first CALIBRATION rows, every later window scored and passed through
    the agent's alert hysteresis with its default policy (`runtime._set_calibration`)."""
    with load_model(bundle, key, threads=1) as loaded:
        series = align_to_grid(stream.offsets, stream.values, 1.0, 2.0)
        cal, seed, ends, outputs = calibrate(loaded.model, loaded.frame, series, CALIBRATION)
        raw = fault_score(outputs, cal, loaded.frame.decision)
        decision = loaded.frame.decision
    keep = max(0, decision.smoothing - 1)
    policy = DecisionPolicy().at_least(decision.alert_windows)
    warm = [float(x) for x in seed[seed.size - keep :]] if keep else []
    decider = AssetDecider("pump-1", SENSORS, policy, decision.smoothing, "replay", warm)
    raised = []
    for end, score in zip(ends, raw, strict=True):
        if end >= CALIBRATION:
            verdict = decider.step(float(score), np.zeros(len(SENSORS)), float(end), float(end))
            if verdict.event is not None and verdict.event.kind == RAISED:
                raised.append(int(end))
    return raised


def test_verdicts_on_captured_windows_fine_tune_a_model_with_fewer_false_alarms(
    plane: RunningPlane,
    broker: Broker,
    publisher: Publisher,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    bundle = fleet_bundle(trained, plane, tmp_path / "bundle")
    config = site_config(plane, broker, tmp_path, bundle)
    stream = site_stream()
    anchor = time.time() - ROWS - 60  # row i is stamped anchor + i: all in the past
    running = start_agent(config)
    try:
        stream_part(running, publisher, stream, slice(0, RESTART_AT), anchor)
        running.stop()  # an agent restart halfway: nothing lost, nothing twice
        captured = dict(running.agent.runtime.capture.captured)
        running = start_agent(config)
        stream_part(running, publisher, stream, slice(RESTART_AT, ROWS), anchor)
        running.stop()  # finishes the windows already cut: their records sync at the next start
        for reason, count in running.agent.runtime.capture.captured.items():
            captured[reason] += count
        running = start_agent(config)
        box = running.agent.outbox
        store = plane.plane.store
        device_id = store.get_device("edge-1").id
        wait_for(lambda: stored_sequences(store, device_id) == box_sequences(box), timeout=60)
    finally:
        running.stop()

    # 1. Every raise's window arrived exactly once (and a few more while it stayed open),
    # with its key; samples of normal windows besides.
    raises = {e.alert_key: e for e in store.list_alert_events(device_id) if e.kind == "raised"}
    since = dt.datetime.fromtimestamp(anchor, dt.UTC)
    captures = store.list_captures(CaptureFilter(since, (device_id,)), limit=10_000)
    alert_windows = [c for c in captures if c.reason == "alert"]
    by_key: dict[str, list[CaptureRecord]] = {}
    for c in alert_windows:
        by_key.setdefault(c.alert_key, []).append(c)
    assert sorted(by_key) == sorted(raises)
    per_alert = config.capture.windows_per_alert
    assert all(1 <= len(v) <= per_alert for v in by_key.values()), by_key
    assert all(v[0].window_end == raises[k].window_end for k, v in by_key.items())
    assert (len(alert_windows), len(captures) - len(alert_windows)) == (
        captured["alert"],
        captured["sample"],
    )
    assert captured["sample"] > 0
    row_of = {k: v[0].window_end.timestamp() - anchor for k, v in by_key.items()}
    in_dip = [k for k, r in row_of.items() if where(r) == "dip"]
    in_fault = [k for k, r in row_of.items() if where(r) == "fault"]
    assert len(in_dip) >= 2 and in_fault, row_of  # the base model flags both dips

    # 2. The operator's verdicts: the dips were false alarms, the fault was real.
    connect = cli_connection(plane, tmp_path)
    give_verdicts(plane, connect, anchor)
    with plane.client() as client:
        client.push_bundle(bundle)  # the base, as the fleet runs it: pump 1

    # 3. Export: Parquet labelled by the verdicts.
    everything, false_alarms = tmp_path / "export", tmp_path / "false-alarms"
    assert autoglm([*connect, "data", "export", "--since", "1d", "--out", str(everything)]) == 0
    assert (
        autoglm(
            [
                *connect,
                "data",
                "export",
                "--since",
                "1d",
                "--verdict",
                "false",
                "--out",
                str(false_alarms),
                "--page-size",
                "3",
            ]
        )
        == 0
    )
    table = pq.read_table(everything / DATA_FILE).to_pylist()
    labels = {(r["alert_key"], r["label"]) for r in table if r["reason"] == "alert"}
    assert {(k, 0) for k in in_dip} | {(k, 1) for k in in_fault} <= labels, labels
    assert all(r["label"] == 0 for r in table if r["reason"] == "sample")
    assert len(table) == len(captures)
    fa_rows = pq.read_table(false_alarms / DATA_FILE).to_pylist()
    assert sorted({r["alert_key"] for r in fa_rows}) == sorted(in_dip)
    assert all(r["verdict"] == "false" and r["label"] == 0 for r in fa_rows)
    summary = (everything / SUMMARY_FILE).read_text()
    assert '"fault": ' in summary and "time_range" in summary

    # 4. Fine-tune the pushed base on the export: real torch, one thread, a few epochs.
    new = tmp_path / "pump-2"
    fine_tune(connect, everything, new, tmp_path / "cloud" / "signing.key")
    key = plane.plane.secrets.signing_key.public_key()
    before = export_scores(bundle, key, false_alarms, stream)
    after = export_scores(new, key, false_alarms, stream)
    fault_rows = tmp_path / "faults"
    assert (
        autoglm(
            [
                *connect,
                "data",
                "export",
                "--since",
                "1d",
                "--verdict",
                "true",
                "--out",
                str(fault_rows),
            ]
        )
        == 0
    )
    fault_before = export_scores(bundle, key, fault_rows, stream)
    fault_after = export_scores(new, key, fault_rows, stream)
    measured = (
        f"false-alarm windows: base {np.round(before, 2).tolist()} -> fine-tuned "
        f"{np.round(after, 2).tolist()}; fault windows: base {np.round(fault_before, 2).tolist()}"
        f" -> {np.round(fault_after, 2).tolist()}"
    )
    print(measured)
    assert after.max() < 1.0, measured  # no window that raised a false alarm would now
    assert fault_after.min() >= 1.0, measured  # and every window of the real fault still does
    manifest = read_own_bundle(new, plane.plane.secrets.signing_key)
    fitted = manifest.training["decision"]
    assert isinstance(fitted, dict) and fitted["false_alarms_left"] == 0, fitted
    assert fitted["windows_without_calibration"] == 0, fitted
    # The forecast carried the dips: residual tolerances raised; a kind not raised stays ().
    assert len(manifest.decision.residual_tolerance) == len(SENSORS), manifest.decision
    for kept in (manifest.decision.level_tolerance, manifest.decision.spread_tolerance):
        assert len(kept) in (0, len(SENSORS)), manifest.decision

    # 5. Replayed through the agent's scoring and alert logic: the base raised at both dips
    # and the fault; the fine-tuned model only at the fault.
    replay = (
        [where(r) for r in replay_raises(bundle, key, stream)],
        [where(r) for r in replay_raises(new, key, stream)],
    )
    print(f"replayed alerts: base {replay[0]} -> fine-tuned {replay[1]}")
    assert replay[0].count("dip") >= 2 and "fault" in replay[0], replay
    assert replay[1] == ["fault"], replay
    with plane.client() as client:  # ready to roll out
        pushed = client.push_bundle(new)
    assert (pushed.name, pushed.version) == ("pump", "2")
    assert manifest.training["fine_tuned_from"] == "pump:1"
