"""The data path's health: the counters its threads keep, and the `AgentHealth` report the
heartbeat and /metrics read from them (rates, drops by reason, latency, outbox, drift)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.asset_stream import AssetRunner
from edge_agent.batching import percentile
from edge_agent.drift import asset_drift
from edge_agent.ingest.decode import DROP_REASONS
from edge_agent.ingest.modbus import MODBUS_DROPS
from edge_agent.ingest.opcua import OPCUA_DROPS
from edge_agent.ingest.sparkplug import SPARKPLUG_DROPS
from edge_agent.wire import lost_records
from protos.autoglm.v1 import agent_pb2

if TYPE_CHECKING:
    from edge_agent.runtime import EdgeRuntime


@dataclass
class RuntimeCounters:
    """Each field has one writer: the pipeline thread (errors, behind_skipped,
    calibration_timeouts) or the sink thread (the rest); the heartbeat and /metrics only read
    them."""

    windows_scored: int = 0
    alerts_raised: int = 0
    alerts_cleared: int = 0
    predictions_kept: int = 0
    errors: int = 0
    outbox_write_failed: int = 0  # records that could not be kept (disk full)
    behind_skipped: int = 0  # windows not scored while inference caught up with a backlog
    unclean_stop_unscored: int = 0  # windows never scored across a kill -9 (site_decisions)
    calibration_timeouts: int = 0  # site calibrations given up (pipeline thread)
    alerts_held_back: int = 0  # raises not published on site: a maintenance period covered them


class IngestRates:
    """Readings per second of each asset since the previous call (the heartbeat's)."""

    def __init__(self, assets: int) -> None:
        self._mark = (time.monotonic(), [0] * assets)

    def since_last(self, runners: Sequence[AssetRunner]) -> dict[str, float]:
        now = time.monotonic()
        then, counts = self._mark
        current = [r.aligner.readings for r in runners]
        elapsed = max(now - then, 1e-6)
        rates = {
            r.name: (c - p) / elapsed for r, c, p in zip(runners, current, counts, strict=False)
        }
        self._mark = (now, current or counts)
        return rates


def drift_of(runtime: EdgeRuntime) -> dict[str, agent_pb2.AssetDrift]:
    """Model health of each calibrated asset (`edge_agent/drift.py`)."""
    if runtime.model is None or runtime.decisions is None:
        return {}
    names = runtime.model.schema.names
    out = {}
    for runner in runtime.runners:
        if runner.calibration is None:
            continue
        values, mask = runner.history.recent()
        trail = runtime.decisions.trails[runner.index]
        out[runner.name] = asset_drift(values, mask, runner.calibration, names, trail)
    return out


def health_of(
    runtime: EdgeRuntime, disk_free: int, rates: dict[str, float]
) -> agent_pb2.AgentHealth:
    """The health report of `runtime`'s data path."""
    counters = runtime.counters
    drops: Counter[str] = Counter(runtime.decoder.drops)
    for r in runtime.runners:
        drops["late"] += r.aligner.counts["late"] + r.carried["late"]
        drops["duplicate"] += r.aligner.counts["duplicate"] + r.carried["duplicate"]
        drops["backlog_full"] += r.aligner.counts["backlog_full"] + r.carried["backlog_full"]
    stats = runtime.outbox.stats()
    worker, sink = runtime.worker, runtime.sink
    latencies = worker.latencies_ms if worker is not None else []
    errors = counters.errors + (worker.errors if worker is not None else 0)
    errors += sink.errors if sink is not None else 0
    errors += runtime.decisions.errors if runtime.decisions is not None else 0
    if stats.evicted:
        drops["outbox_evicted"] = stats.evicted
    drops["rejected_by_cloud"] = stats.quarantined
    drops["outbox_write_failed"] = counters.outbox_write_failed
    drops["sparse_window"] = sum(r.sparse_windows for r in runtime.runners)
    drops["behind_skipped"] = counters.behind_skipped
    drops["unclean_stop"] = counters.unclean_stop_unscored
    drops["calibration_timeout"] = counters.calibration_timeouts
    drops["capture_over_budget"] = runtime.capture.over_budget
    offsets = {
        r.name: round(offset, 1)
        for r in runtime.runners
        if abs(offset := runtime.decoder.clock_offset(r.index)) >= CLOCK_REPORT_S
    }
    return agent_pb2.AgentHealth(
        drift=drift_of(runtime),
        clock_offset_s=offsets,
        sensor_clock_offset_s=runtime.decoder.sensor_clocks.skews,
        ingest_rate_per_s=rates,
        dropped_by_reason={k: v for k, v in drops.items() if v and k in _REPORTED},
        inference_latency_p50_ms=percentile(latencies, 50),
        inference_latency_p99_ms=percentile(latencies, 99),
        outbox_depth=stats.depth,
        outbox_bytes=stats.bytes,
        disk_free_bytes=disk_free,
        windows_scored=counters.windows_scored,
        alerts_raised=counters.alerts_raised,
        errors=errors,
        lost_records=lost_records(runtime.losses.recent()),
    )


CLOCK_REPORT_S = 1.0  # a stream clock this far from the device's is reported in health
_REPORTED = frozenset(
    (
        *DROP_REASONS,
        *SPARKPLUG_DROPS,
        *MODBUS_DROPS,
        *OPCUA_DROPS,
        "outbox_evicted",
        "outbox_write_failed",
        "sparse_window",
        "rejected_by_cloud",
        "behind_skipped",
        "unclean_stop",
        "calibration_timeout",
        "capture_over_budget",
    )
)
