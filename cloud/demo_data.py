"""Simulated pump data for `autoglm demo`: labelled training files, the live streams with
their injected faults, and how alerts score against those faults."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.batching import percentile
from edge_agent.simulate import FAULTS, Fault, Stream, pump_stream

TRAIN_FILES = 9
TRAIN_SECONDS = 900
FAULT_SECONDS = 150
# An alert counts for a fault when it opens from a little before the fault (the window
# reaching into it) to a little after it ends (smoothing and debounce lag).
MATCH_BEFORE_S = 30.0
MATCH_AFTER_S = 60.0


def write_training_data(root: Path, seed: int = 0) -> Path:
    """`root/pump-<i>.csv`: 15 minutes at 1 Hz each, one labelled fault of every kind in turn."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(TRAIN_FILES):
        fault = Fault(FAULTS[i % len(FAULTS)], 300.0 + 20 * (i % 4), FAULT_SECONDS)
        write_labelled_csv(root / f"pump-{i}.csv", pump_stream(TRAIN_SECONDS, [fault], seed + i))
    return root


def write_labelled_csv(path: Path, stream: Stream) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    inside = np.zeros(stream.offsets.size, dtype=int)
    for f in stream.faults:
        inside[(stream.offsets >= f.start_s) & (stream.offsets < f.start_s + f.duration_s)] = 1
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(["datetime", *stream.sensors, "anomaly"])
        for r in range(stream.offsets.size):
            stamp = start + dt.timedelta(seconds=float(stream.offsets[r]))
            values = (f"{v:.5f}" for v in stream.values[r])
            writer.writerow([stamp.strftime("%Y-%m-%d %H:%M:%S"), *values, inside[r]])


def live_stream(asset_index: int, seconds: int, seed: int) -> Stream:
    """One asset's live data: normal first (the agent calibrates on it), then a fault every
    `seconds / 3` or so, of a kind that differs per asset."""
    faults = []
    start = 240.0
    k = asset_index
    while start + FAULT_SECONDS + 60 <= seconds:
        faults.append(Fault(FAULTS[k % len(FAULTS)], start, FAULT_SECONDS))
        start += FAULT_SECONDS + 240
        k += 1
    return pump_stream(seconds, faults, seed=1000 + seed + asset_index)


@dataclass(frozen=True)
class InjectedFault:
    asset: str
    kind: str
    start_ts: float  # data timestamps (seconds since the epoch)
    end_ts: float
    published_at: float = 0.0  # wall clock when its first reading was published


@dataclass(frozen=True)
class SeenAlert:
    alert_id: str
    asset: str
    first_seen_ts: float  # data timestamp the edge raised it at
    received_at: float  # wall clock the watch stream delivered it
    top_sensors: tuple[str, ...]


@dataclass(frozen=True)
class Score:
    faults_injected: int
    faults_detected: int
    false_alarms: int
    alert_latency_p50_ms: float | None  # None: nothing detected
    alert_latency_p99_ms: float | None


def score(faults: list[InjectedFault], alerts: list[SeenAlert]) -> Score:
    """Each fault is detected by the first alert of its asset that opens within its span
    (with the margins above); alerts that match no fault are false alarms. Latency: from the
    fault's first reading published to that alert reaching the watch stream."""
    used: set[str] = set()
    latencies: list[float] = []
    detected = 0
    for f in faults:
        for a in sorted(alerts, key=lambda a: a.received_at):
            if a.alert_id in used or a.asset != f.asset:
                continue
            if f.start_ts - MATCH_BEFORE_S <= a.first_seen_ts <= f.end_ts + MATCH_AFTER_S:
                used.add(a.alert_id)
                detected += 1
                latencies.append(max(0.0, a.received_at - f.published_at) * 1000.0)
                break
    false_alarms = sum(1 for a in alerts if a.alert_id not in used)
    return Score(
        faults_injected=len(faults),
        faults_detected=detected,
        false_alarms=false_alarms,
        alert_latency_p50_ms=round(percentile(latencies, 50), 1) if latencies else None,
        alert_latency_p99_ms=round(percentile(latencies, 99), 1) if latencies else None,
    )
