"""The agent's data path on site: MQTT -> decode -> align -> calibrate -> batched inference ->
decisions -> local alerts and the outbox.

Threads: paho's network thread decodes and enqueues; the pipeline thread aligns readings
and cuts windows; the inference thread batches windows across assets, scores them and
decides. Each piece of state belongs to one thread; they meet only in queues.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.asset_stream import AssetRunner
from edge_agent.batching import InferenceWorker, WindowJob, percentile
from edge_agent.calibration import (
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    score_of,
    sensor_evidence,
)
from edge_agent.calibration_store import CalibrationStore
from edge_agent.capture import CaptureSampler, captured
from edge_agent.config import AgentConfig, AssetConfig
from edge_agent.decisions import AssetDecider, Verdict
from edge_agent.drift import ScoreTrail, asset_drift
from edge_agent.errors import AutoglmError, LocalStateError
from edge_agent.inference.base import InferenceBackend, Outputs
from edge_agent.ingest.decode import DROP_REASONS, Chunk, Decoded, Decoder, TopicRoutes
from edge_agent.ingest.fair_queue import FairQueue
from edge_agent.ingest.modbus import MODBUS_DROPS
from edge_agent.ingest.opcua import OPCUA_DROPS
from edge_agent.ingest.sparkplug import SPARKPLUG_DROPS
from edge_agent.losses import LossLog
from edge_agent.maintenance import SiteMaintenance
from edge_agent.open_alerts import OpenAlerts
from edge_agent.outbox import ALERT, CAPTURE, PREDICTION, Outbox
from edge_agent.scoring import calibrate, window_statistics
from edge_agent.serving import ServingModel
from edge_agent.site_alerts import SiteAlerts
from edge_agent.sources import Sources
from edge_agent.stream_state import StreamStates
from edge_agent.windowing import AlignedSeries
from edge_agent.wire import alert_record, capture_record, lost_records, prediction_record
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
_DRAIN = 5000
# After a drain, the pipeline thread lets readings gather this long before the next one: one
# wake-up per few milliseconds of messages instead of one per message (the thread switch cost
# more than the message); a reading waits at most this much longer.
_GATHER_S = 0.002


@dataclass
class RuntimeCounters:
    windows_scored: int = 0
    alerts_raised: int = 0
    alerts_cleared: int = 0
    predictions_kept: int = 0
    errors: int = 0
    outbox_write_failed: int = 0  # records that could not be kept (disk full)
    behind_skipped: int = 0  # windows not scored while inference caught up with a backlog
    alerts_held_back: int = 0  # raises not published on site: a maintenance period covered them


class EdgeRuntime:
    """Ingest, inference and decisions for the assets of one agent."""

    def __init__(
        self,
        config: AgentConfig,
        model: ServingModel | None,
        outbox: Outbox,
        client_id: str,
        on_verdict: Callable[[Verdict], None] | None = None,
        device: str = "",
        observe_batch: Callable[[list[float]], None] | None = None,
    ) -> None:
        self.config = config
        # Site topics carry it: agents sharing a broker must not overwrite each other's state.
        self.device = device or client_id
        self.model = model
        self.outbox = outbox
        self.on_verdict = on_verdict
        self.assets: list[AssetConfig] = list(config.assets)
        self.counters = RuntimeCounters()
        schema = model.schema.names if model is not None else None
        self.routes = TopicRoutes(self.assets, schema)
        self.decoder = Decoder(self.routes, config.ingest)
        self._queue = FairQueue(
            len(self.assets),
            config.ingest.max_backlog_readings,
            self._backlog_full,
            config.ingest.backlog_block_s,
        )
        self._stop = threading.Event()
        self._pipeline = threading.Thread(target=self._run_pipeline, name="pipeline", daemon=True)
        self.calibrations = CalibrationStore(config.state_dir / "calibration")
        self.open_alerts = OpenAlerts(config.state_dir / "alerts")
        self.maintenance = SiteMaintenance(config.state_dir)
        # On site: MQTT alert and state topics, SCADA; raises a maintenance period covers held.
        self.site = SiteAlerts(
            self.device,
            config.mqtt.alert_prefix,
            self.maintenance,
            self.open_alerts,
            self.counters,
            lambda topic, payload, retain: self.mqtt.publish(topic, payload, qos=1, retain=retain),
            lambda event: self.sources.alert(event),
        )
        self.streams = StreamStates(config.state_dir / "stream")
        self._lost_logged_at = -math.inf
        # Alert events the outbox could not take (disk full), oldest first: written first
        # when it can again. Bounded: past it the oldest are counted as lost.
        self._waiting_alerts: deque[tuple[int, bytes]] = deque(maxlen=WAITING_ALERTS)
        self.losses = LossLog()  # when records were lost, for the heartbeat
        self.runners: list[AssetRunner] = []
        self.deciders: list[AssetDecider | None] = [None] * len(self.assets)
        self.trails = [ScoreTrail() for _ in self.assets]
        self.capture = CaptureSampler(config.capture, config.state_dir / "capture.json")
        self._kept_every: Counter[int] = Counter()
        self._cut_count: Counter[int] = Counter()  # windows cut per asset while behind
        self._behind_logged_at = -math.inf
        self._health_mark = (time.monotonic(), [0] * len(self.assets))
        self.worker: InferenceWorker | None = None
        if model is not None:
            lateness = config.ingest.max_lateness_s or 2 * model.spec.period_s
            self.runners = [
                AssetRunner(
                    i,
                    a.name,
                    model,
                    lateness,
                    config.shadow.history_rows,
                    config.ingest.close_complete_slots,
                )
                for i, a in enumerate(self.assets)
            ]
            for runner in self.runners:
                stored = self.calibrations.load(model.version, runner.name, model.schema.names)
                if stored is not None:
                    self._set_calibration(runner, *stored)
            for runner in self.runners:
                self._resume_stream(runner)
            self.worker = InferenceWorker(
                model.backend,
                self._on_results,
                config.batching.max_batch,
                config.batching.max_wait_ms / 1000.0,
                observe_batch,
            )
        published = [self.open_alerts.load(a.name) for a in self.assets]
        self.sources = Sources(
            config,
            self.assets,
            client_id,
            self.routes,
            self.decoder,
            self._queue.put,
            [e for e in published if e is not None and e.asset not in self.site.held],
        )
        self.mqtt = self.sources.mqtt
        self.sparkplug_in, self.modbus = self.sources.sparkplug_in, self.sources.modbus

    # ---- lifecycle ----
    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
        self._pipeline.start()
        self.sources.start()

    def stop(self) -> None:
        """Stops ingest, then finishes the windows already cut, then stops inference, then
        keeps what is not scored yet for the next start (`stream_state`)."""
        self.sources.stop()
        self._stop.set()
        self._pipeline.join(10)
        if self.worker is not None:
            self.worker.stop()
            if self.worker.running:  # stuck: its deciders and queue are still in use
                log.error("inference did not stop in time; the stream is not kept")
                return
        if self._waiting_alerts:  # a last try: the disk may have space again
            self._keep([])
            if self._waiting_alerts:
                log.error(
                    "%d alert event(s) could not be written before stopping (disk full); "
                    "they were published on site but will not reach the control plane",
                    len(self._waiting_alerts),
                )
        if not self._pipeline.is_alive():
            self._keep_streams()

    def _keep_streams(self) -> None:
        model = self.model
        if model is None:
            return
        for runner in self.runners:
            state = runner.snapshot()
            decider = self.deciders[runner.index]
            if decider is not None:
                state |= decider.snapshot()
            self.streams.save(runner.name, model.version, model.schema.names, state)

    def _resume_stream(self, runner: AssetRunner) -> None:
        model = self.model
        assert model is not None
        state = self.streams.take(runner.name, model.version, model.schema.names)
        if state is None:
            return
        try:
            runner.restore(state)
            decider = self.deciders[runner.index]
            if decider is not None:
                decider.restore(state)
        except (ValueError, KeyError) as exc:
            log.warning("stream state of %s not resumed (%s)", runner.name, exc)
            runner.reset_stream()
            return
        log.info(
            "resumed %s: %d rows of the window ring, %d open readings",
            runner.name,
            runner.filled,
            runner.aligner.pending_readings,
        )

    def threads_alive(self) -> dict[str, bool]:
        """The data path's threads (for the liveness probe)."""
        mqtt_thread = getattr(self.mqtt.client, "_thread", None)
        alive = {
            "pipeline": self._pipeline.is_alive(),
            "mqtt": mqtt_thread is not None and mqtt_thread.is_alive(),
        }
        if self.worker is not None:
            alive["inference"] = self.worker.running
        alive.update(self.sources.threads_alive())
        return alive

    # ---- pipeline thread ----
    def _backlog_full(self, asset: int, readings: int) -> None:
        name = self.assets[asset].name
        self.decoder.drop("backlog_full", name, f"{readings} readings", readings)

    def _run_pipeline(self) -> None:
        while True:
            items = self._queue.take(_DRAIN, timeout=0.1)  # one per asset in turn
            if not items:
                if self._stop.is_set():
                    return
                continue
            touched: set[int] = set()
            for item in items:
                try:
                    self._add(item, touched)
                except Exception:
                    self.counters.errors += 1
                    log.exception("pipeline failed on a decoded message; dropped")
            drained = len(items)
            for index in touched:
                runner = self.runners[index]
                self._follow_clock(runner)
                now = time.time() + max(0.0, self.decoder.clock_offset(index))
                while (rows := runner.aligner.close_ready(now)) is not None:
                    runner.feed(rows, self._emit, self._start_calibration)
            if drained < _DRAIN:
                time.sleep(_GATHER_S)

    def _add(self, item: Decoded, touched: set[int]) -> None:
        if isinstance(item, tuple):
            asset, sensor, ts, value = item
            self.runners[asset].aligner.add(sensor, ts, value)
            touched.add(asset)
            return
        for chunk in item:
            assert isinstance(chunk, Chunk)
            self.runners[chunk.asset].aligner.add_many(chunk.sensor, chunk.ts, chunk.values)
            touched.add(chunk.asset)

    def _follow_clock(self, runner: AssetRunner) -> None:
        runner.follow_clock(self.decoder.clock_offset(runner.index))

    def _emit(self, job: WindowJob) -> None:
        """Queues a window for inference. Behind (a backlog replayed after an outage, a model
        slower than the stream), it catches up instead of queueing without bound: with
        `CATCH_UP_FROM` windows waiting, only every 2nd window of each asset is scored, every
        4th at twice that, and so on (at most every 64th); the skipped ones are counted
        (`behind_skipped` in health and /metrics) and said once a minute."""
        worker = self.worker
        assert worker is not None
        limit = CATCH_UP_FROM * max(1, self.config.batching.max_batch)
        behind = worker.waiting // limit
        if behind:
            every = 1 << min(6, behind)
            self._cut_count[job.asset] += 1
            if self._cut_count[job.asset] % every:
                self.counters.behind_skipped += 1
                now = time.monotonic()
                if now - self._behind_logged_at >= 60.0:
                    self._behind_logged_at = now
                    log.warning(
                        "inference is behind (%d windows waiting): scoring every %dth window "
                        "of each asset until it catches up; %d skipped so far",
                        worker.waiting,
                        every,
                        self.counters.behind_skipped,
                    )
                return
        worker.submit(job)

    def run_on_inference_thread(
        self, task: Callable[[InferenceBackend], None], timeout_s: float = 120.0
    ) -> None:
        """Runs `task` with the serving backend on the inference thread and waits for it
        (at most `timeout_s`: a stopped runtime runs nothing more)."""
        if self.worker is None:
            return
        done = threading.Event()

        def wrapped(backend: InferenceBackend) -> None:
            try:
                task(backend)
            finally:
                done.set()

        self.worker.submit(wrapped)
        done.wait(timeout_s)

    def _start_calibration(self, runner: AssetRunner, series: AlignedSeries) -> None:
        """Calibrates on the inference thread (the only one that calls the backend) and waits
        for it, so the rows after the calibration stretch are all scored."""
        model = self.model
        assert model is not None and self.worker is not None
        done = threading.Event()

        def task(backend: InferenceBackend) -> None:
            try:
                cal, raw, _, _ = calibrate(backend, model.frame, series, series.slots)
                keep = max(0, model.frame.decision.smoothing - 1)
                seed = [float(x) for x in raw[raw.size - keep :]] if keep else []
                try:
                    self.calibrations.save(
                        model.version, runner.name, model.schema.names, cal, seed
                    )
                except OSError as exc:  # disk full: alert on it anyway, calibrate again later
                    log.error(
                        "cannot keep the calibration of %s (%s); it serves from memory and is "
                        "redone after a restart",
                        runner.name,
                        exc,
                    )
                log.info("calibrated %s on %d rows", runner.name, series.slots)
                self._set_calibration(runner, cal, seed)
            except AutoglmError as exc:
                log.warning("calibration of %s failed (%s); collecting again", runner.name, exc)
            finally:
                done.set()

        self.worker.submit(task)
        done.wait()

    def _set_calibration(
        self, runner: AssetRunner, cal: SiteCalibration, seed: list[float]
    ) -> None:
        assert self.model is not None
        still_open = self.open_alerts.load(runner.name)
        if still_open is not None and self.open_alerts.is_held(runner.name):
            self.site.held[runner.name] = still_open  # not published yet: a period covered it
        self.deciders[runner.index] = AssetDecider(
            runner.name,
            self.model.schema.names,
            self.config.decisions.at_least(self.model.frame.decision.alert_windows),
            self.model.frame.decision.smoothing,
            self.model.version,
            seed,
            still_open,
        )
        runner.calibration = cal  # last: the pipeline thread starts cutting windows after it

    # ---- inference thread ----
    def _on_results(self, jobs: Sequence[WindowJob], outputs: Outputs) -> None:
        model = self.model
        assert model is not None
        frame = model.frame
        decision = frame.decision
        policy = self.config.decisions
        windows = np.stack([job.window for job in jobs])
        masks = np.stack([job.mask for job in jobs])
        level, spread, before = window_statistics(frame, windows, masks)
        out = WindowOutputs(*outputs, level=level, spread=spread, before=before)
        records: list[tuple[int, bytes]] = []
        for i, job in enumerate(jobs):
            decider = self.deciders[job.asset]
            cal = self.runners[job.asset].calibration
            if decider is None or cal is None:
                continue
            one = out.select(np.asarray([i]))
            values = evidence_values(one, cal, decision)  # once, for the score and the sensors
            raw = float(score_of(values, decision)[0])
            evidence = sensor_evidence(one, cal, decision, values)
            verdict = decider.step(raw, evidence, job.window_start, job.window_end)
            self.counters.windows_scored += 1
            raised = verdict.event is not None and verdict.event.kind == "raised"
            self.trails[job.asset].add(verdict.score, job.window_end, raised)
            if self.site.held:
                self.site.release_held(verdict.asset, job.window_end)
            if verdict.event is not None:
                self.open_alerts.update(verdict.event)
                self.site.announce(verdict.event)
                records.append((ALERT, alert_record(verdict.event)))
            every = self.config.outbox.prediction_every
            self._kept_every[job.asset] += 1
            if (
                verdict.score >= policy.clear_at
                or verdict.alerting
                or self._kept_every[job.asset] % every == 1 % every
            ):
                records.append((PREDICTION, prediction_record(verdict, model.version)))
                self.counters.predictions_kept += 1
            key = decider.open.key if decider.open is not None else ""
            reason = self.capture.reason_for(verdict.asset, key, verdict.score, job.window_end)
            if reason and job.raw is not None:
                body = capture_record(captured(reason, key, job, verdict, cal, model))
                if self.capture.admit(reason, len(body), verdict.score, job.window_end):
                    records.append((CAPTURE, body))  # after its alert event: a verdict finds it
            if self.on_verdict is not None:
                self.on_verdict(verdict)
        if records:
            self._keep(records)

    def _keep(self, records: list[tuple[int, bytes]]) -> None:
        """Into the outbox. When it cannot be written (disk full) the data path goes on (site
        alerts are already published): alert events wait in a bounded queue in memory and
        are written first once space returns; predictions are counted as lost (heartbeat:
        dropped_by_reason outbox_write_failed), said once a minute."""
        if self._waiting_alerts:
            records = [*self._waiting_alerts, *records]
        try:
            self.outbox.append(records)
            self.losses.written()
            if self._waiting_alerts:
                log.info("%d alert event(s) kept in memory are in the outbox now",
                         len(self._waiting_alerts))  # fmt: skip
                self._waiting_alerts.clear()
        except LocalStateError as exc:
            alerts = [r for r in records if r[0] == ALERT]
            lost = len(records) - len(alerts)
            self._waiting_alerts.clear()
            self._waiting_alerts.extend(alerts)
            overflow = len(alerts) - len(self._waiting_alerts)  # the oldest, past the bound
            self.counters.outbox_write_failed += lost + overflow
            self.losses.lost(lost + overflow, time.time())
            now = time.monotonic()
            if now - self._lost_logged_at >= 60.0:
                self._lost_logged_at = now
                log.error(
                    "%s; %d record(s) lost so far (free disk space)",
                    exc,
                    self.counters.outbox_write_failed,
                )

    # ---- health ----
    def drift(self) -> dict[str, agent_pb2.AssetDrift]:
        """Model health of each calibrated asset (`edge_agent/drift.py`)."""
        if self.model is None:
            return {}
        names = self.model.schema.names
        out = {}
        for runner in self.runners:
            if runner.calibration is None:
                continue
            values, mask = runner.history.recent()
            out[runner.name] = asset_drift(
                values, mask, runner.calibration, names, self.trails[runner.index]
            )
        return out

    def health(self, disk_free: int, rates_since_last: bool = True) -> agent_pb2.AgentHealth:
        """The health report. `rates_since_last`: ingest rates since the previous such call
        (the heartbeat's); False (a metrics scrape) leaves them out and the mark alone."""
        rates: dict[str, float] = {}
        if rates_since_last:
            now = time.monotonic()
            then, counts = self._health_mark
            current = [r.aligner.readings for r in self.runners]
            elapsed = max(now - then, 1e-6)
            rates = {
                r.name: (c - p) / elapsed
                for r, c, p in zip(self.runners, current, counts, strict=False)
            }
            self._health_mark = (now, current or [0] * len(self.assets))
        drops: Counter[str] = Counter(self.decoder.drops)
        for r in self.runners:
            drops["late"] += r.aligner.counts["late"] + r.carried["late"]
            drops["duplicate"] += r.aligner.counts["duplicate"] + r.carried["duplicate"]
        stats = self.outbox.stats()
        latencies = self.worker.latencies_ms if self.worker is not None else []
        errors = self.counters.errors + (self.worker.errors if self.worker is not None else 0)
        if stats.evicted:
            drops["outbox_evicted"] = stats.evicted
        drops["rejected_by_cloud"] = stats.quarantined
        drops["outbox_write_failed"] = self.counters.outbox_write_failed
        drops["sparse_window"] = sum(r.sparse_windows for r in self.runners)
        drops["behind_skipped"] = self.counters.behind_skipped
        drops["capture_over_budget"] = self.capture.over_budget
        offsets = {
            r.name: round(offset, 1)
            for r in self.runners
            if abs(offset := self.decoder.clock_offset(r.index)) >= CLOCK_REPORT_S
        }
        return agent_pb2.AgentHealth(
            drift=self.drift(),
            clock_offset_s=offsets,
            ingest_rate_per_s=rates,
            dropped_by_reason={k: v for k, v in drops.items() if v and k in _REPORTED},
            inference_latency_p50_ms=percentile(latencies, 50),
            inference_latency_p99_ms=percentile(latencies, 99),
            outbox_depth=stats.depth,
            outbox_bytes=stats.bytes,
            disk_free_bytes=disk_free,
            windows_scored=self.counters.windows_scored,
            alerts_raised=self.counters.alerts_raised,
            errors=errors,
            lost_records=lost_records(self.losses.recent()),
        )


CLOCK_REPORT_S = 1.0  # a stream clock this far from the device's is reported in health
CATCH_UP_FROM = 8  # batches' worth of windows waiting: inference is behind
WAITING_ALERTS = 10_000  # alert events held in memory while the outbox cannot be written
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
        "capture_over_budget",
    )
)
