"""Exports of the learning loop's site without the plumbing: what an agent serving a bundle
would capture from a site stream (`tests.support.learning_site.site_stream`), labelled as the
operator would (dips false alarms, the fault true), written by `write_export`; and the scores
an agent serving a model gives chosen windows of the stream. For the federated test, where
two sites' exports (and their union) are needed and the capture path itself is
tests/test_learning_loop.py's to prove."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.captures import CaptureLabel, CaptureRecord
from cloud.model.backtest import load_model
from cloud.model.capture_data import write_export
from cloud.service.records import capture_from_proto
from edge_agent.calibration import fault_score
from edge_agent.capture import ALERT, SAMPLE, CapturedWindow
from edge_agent.scoring import calibrate
from edge_agent.simulate import Stream
from edge_agent.windowing import align_to_grid
from tests.support.captures import capture_proto
from tests.support.learning_site import CALIBRATION, where

ALERT_EVERY = 4  # every 4th window the base scores >= 1 in a dip or the fault is captured
SAMPLE_EVERY = 10  # and every 10th window elsewhere, as a sampled normal window
T0 = 1_790_000_000.0

Captured = tuple[CaptureRecord, CaptureLabel, str]


def stream_scores(
    bundle: Path, key: ed25519.Ed25519PublicKey, stream: Stream
) -> tuple[np.ndarray, np.ndarray]:
    """Window ends and raw (unsmoothed) scores of an agent serving `bundle` from the stream's
    start, calibrated on its first CALIBRATION rows."""
    with load_model(bundle, key, threads=1) as loaded:
        series = align_to_grid(stream.offsets, stream.values, 1.0, 2.0)
        cal, _, ends, outputs = calibrate(loaded.model, loaded.frame, series, CALIBRATION)
        return ends, fault_score(outputs, cal, loaded.frame.decision)


def site_captures(
    bundle: Path, key: ed25519.Ed25519PublicKey, stream: Stream, device: str
) -> list[Captured]:
    """The windows an agent serving `bundle` would capture from `stream`, with verdicts."""
    with load_model(bundle, key, threads=1) as loaded:
        series = align_to_grid(stream.offsets, stream.values, 1.0, 2.0)
        cal, _, ends, outputs = calibrate(loaded.model, loaded.frame, series, CALIBRATION)
        raw = fault_score(outputs, cal, loaded.frame.decision)
        length, version = loaded.frame.window, loaded.manifest.version
        names = tuple(s.name for s in loaded.manifest.sensors)
    out: list[Captured] = []
    alerting = 0
    for end, score in zip(ends.tolist(), raw.tolist(), strict=True):
        what = where(end)
        if end < CALIBRATION:
            continue
        if what in ("dip", "fault") and score >= 1.0:
            alerting += 1
            if alerting % ALERT_EVERY:
                continue
            reason, verdict = ALERT, "false" if what == "dip" else "true"
        elif what.startswith("row") and end % SAMPLE_EVERY == 0:
            reason, verdict = SAMPLE, ""
        else:
            continue
        rows = slice(end - length + 1, end + 1)
        mask = series.mask[rows].astype(np.float32)
        window = CapturedWindow(
            reason=reason,
            asset="pump-1",
            model_version=version,
            alert_key=f"{device}-{what}" if reason == ALERT else "",
            score=float(score),
            window_start=T0 + end - length + 1,
            period_s=1.0,
            sensors=names,
            values=np.where(mask > 0, series.values[rows], 0.0).astype(np.float32),
            mask=mask,
            input_center=cal.input_center,
            input_scale=cal.input_scale,
            calibration=cal,
        )
        seq = len(out) + 1
        record = capture_from_proto(device, seq, capture_proto(seq, window).capture, "test")
        out.append((record, CaptureLabel(f"alert-{device}-{what}", verdict), device))
    return out


def export_of(captures: Iterable[Captured], out: Path) -> Path:
    write_export(captures, out, {})
    return out
