"""The agent's data path on site: MQTT -> decode -> align -> calibrate -> batched inference ->
decisions -> local alerts and the outbox.

Threads, each with one job: paho's network thread (and the other sources') decodes and
enqueues; the pipeline thread aligns readings and cuts windows (`pipeline.py`); the inference
thread batches windows across assets and runs the model (`batching.py`); the sink thread
decides, alerts on site and writes the outbox (`sink.py`). Each piece of state belongs to one
thread; they meet only in queues. This module builds them, starts and stops them in order,
and keeps the unscored stream across restarts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.asset_stream import AssetRunner
from edge_agent.batching import InferenceWorker
from edge_agent.calibration import SiteCalibration
from edge_agent.calibration_store import CalibrationStore
from edge_agent.capture import CaptureSampler
from edge_agent.config import AgentConfig, AssetConfig
from edge_agent.decisions import AlertEvent, Verdict
from edge_agent.errors import AutoglmError
from edge_agent.health import IngestRates, RuntimeCounters, drift_of, health_of
from edge_agent.inference.base import InferenceBackend
from edge_agent.ingest.decode import Decoder, TopicRoutes
from edge_agent.logs import ids
from edge_agent.losses import LossLog
from edge_agent.maintenance import SiteMaintenance
from edge_agent.open_alerts import OpenAlerts, decode_alert
from edge_agent.outbox import Outbox
from edge_agent.pipeline import Pipeline
from edge_agent.scoring import calibrate
from edge_agent.serving import ServingModel
from edge_agent.sink import ResultSink
from edge_agent.site_alerts import SiteAlerts
from edge_agent.site_decisions import SiteDecisions
from edge_agent.sources import Sources
from edge_agent.stream_state import StreamStates
from edge_agent.windowing import AlignedSeries
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)
# An asset whose calibration waits for an alert open on it (raised before a restart onto a new
# version, or with its calibration lost) waits at most this long, then calibrates on what it
# sees: nothing on the agent closes that alert otherwise.
OPEN_ALERT_CALIBRATION_WAIT_S = 6 * 3600.0
# The message rate limit is kept this many times above what a model's assets send normally.
RATE_HEADROOM = 4.0


@dataclass
class CalibrationOutcome:
    """One site calibration's end, decided under `lock`: installed, or given up at the bound
    (a late result then discarded), never both."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    installed: bool = False
    given_up: bool = False
    ended: bool = False
    error: str = ""  # why it failed, where it raised (written before `done` is set)


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
        self.assets: list[AssetConfig] = list(config.assets)
        self.counters = RuntimeCounters()
        self.losses = LossLog()  # when records were lost, for the heartbeat
        self._rates = IngestRates(len(self.assets))
        schema = model.schema.names if model is not None else None
        self.routes = TopicRoutes(self.assets, schema)
        self.decoder = Decoder(self.routes, config.ingest)
        if model is not None and self.decoder.rates is not None:
            self._rate_floor(model)
        self.calibrations = CalibrationStore(config.state_dir / "calibration")
        # Raises held back by maintenance are marked there; alerts open are kept by the outbox
        # (it takes over those an older agent kept there as files).
        self.open_alerts = OpenAlerts(config.state_dir / "alerts")
        outbox.adopt_open_alerts(config.state_dir / "alerts")
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
            lambda: self.outbox.problem is None,
        )
        self.streams = StreamStates(config.state_dir / "stream")
        # The previous data path here never stopped cleanly (kill -9): count what it lost.
        self.unclean = model is not None and self.streams.unclean()
        self.clock: Callable[[], float] = time.monotonic  # checkpoints and waits (tests)
        # By asset: since when its calibration waits for an alert open on it to close.
        self._calibration_waits: dict[str, float] = {}
        self._checkpointed_at = self.clock()
        self._checkpointed: dict[int, tuple[int, int]] = {}  # by asset: aligner, readings
        self._checkpoint_failed_at = -math.inf
        # Calibrations given up on but still queued or running on the inference thread: a new
        # one would only wait behind them (pipeline thread writes, the inference thread ends).
        self._calibrations_given_up = 0
        self._given_up_lock = threading.Lock()
        self.capture = CaptureSampler(config.capture, config.state_dir / "capture.json")
        self.runners: list[AssetRunner] = []
        self.decisions: SiteDecisions | None = None
        self.sink: ResultSink | None = None
        self.worker: InferenceWorker | None = None
        if model is not None:
            self._serve(model, on_verdict, observe_batch)
        self.pipeline = Pipeline(
            self.assets,
            config.ingest,
            self.decoder,
            self.runners,
            self.worker,
            config.batching.max_batch,
            self.counters,
            self.start_calibration,
            self.checkpoint_streams,
        )
        published = [self.kept_open(a.name) for a in self.assets]
        for event in published:
            if event is not None:
                log.info("alert %s on %s is open (raised before this start)", event.key,
                         event.asset)  # fmt: skip
        self.sources = Sources(
            config,
            self.assets,
            client_id,
            self.routes,
            self.decoder,
            self.pipeline.queue.put,
            # Held back by maintenance: marked on disk whether or not the asset has a
            # calibration for this model yet (`site.held` is filled only where it does).
            [e for e in published if e is not None and not self.open_alerts.is_held(e.asset)],
        )
        self.mqtt = self.sources.mqtt
        self.sparkplug_in, self.modbus = self.sources.sparkplug_in, self.sources.modbus

    def _serve(
        self,
        model: ServingModel,
        on_verdict: Callable[[Verdict], None] | None,
        observe_batch: Callable[[list[float]], None] | None,
    ) -> None:
        """The assets' streams, the sink and the inference worker on `model`; stored
        calibrations and streams resumed."""
        config = self.config
        lateness = config.ingest.max_lateness_s or 2 * model.spec.period_s
        self.runners[:] = [
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
        decisions = SiteDecisions(
            config,
            model,
            self.runners,
            self.site,
            self.open_alerts,
            self.capture,
            self.counters,
            self.losses,
            self.kept_open,
        )
        self.decisions = decisions
        sink = ResultSink(
            decisions.decide,
            self.outbox,
            self.counters,
            self.losses,
            on_verdict,
            scored=decisions.marks,
            open_alerts=decisions.open_state,
            after_keep=decisions.publish_site,
            # Scoring marks without records kept as often as the stream checkpoints (0: the
            # sink's default), so a kill decides again only that much.
            mark_every_s=config.ingest.checkpoint_s or None,
        )
        self.sink = sink
        for runner in self.runners:
            stored = self.calibrations.load(model.version, runner.name, model.schema.names)
            if stored is not None:
                decisions.install(runner, *stored)
        for runner in self.runners:
            self._resume_stream(runner)
        if self.unclean:
            kept = self.outbox.scored_through()
            log.warning(
                "the previous run did not stop cleanly (kill -9, power loss): each stream "
                "resumes from its last checkpoint; windows it never scored are counted"
            )
            for runner in self.runners:
                if runner.name in kept:
                    decisions.resume(runner, kept[runner.name])
        self.worker = InferenceWorker(
            model.backend,
            sink.submit,
            config.batching.max_batch,
            config.batching.max_wait_ms / 1000.0,
            observe_batch,
        )

    def _rate_floor(self, model: ServingModel) -> None:
        """Keeps `ingest.max_messages_per_s` above what the model's assets send normally: each
        sensor on a topic of its own every period, RATE_HEADROOM times over (a high-rate asset
        under a limit meant for floods lost its readings, counted only as rate_limited)."""
        rates = self.decoder.rates
        assert rates is not None
        floor = RATE_HEADROOM * len(model.schema.names) / model.spec.period_s
        if rates.per_s < floor:
            log.warning(
                "ingest.max_messages_per_s %g is below what model %s's assets may send (%d "
                "sensors every %g s, one message each): %g a second used",
                rates.per_s, model.version, len(model.schema.names), model.spec.period_s, floor,
            )  # fmt: skip
            rates.raise_to(floor)

    def kept_open(self, asset: str) -> AlertEvent | None:
        """The alert the outbox keeps open on `asset` (raised, its clear not written yet)."""
        text = self.outbox.open_alert_events().get(asset)
        return decode_alert(text, asset) if text is not None else None

    # ---- lifecycle ----
    def start(self) -> None:
        self.start_inference()
        self.pipeline.start()
        self.sources.start()
        # Started: another model's stream states that `take` left in place (a swap that
        # might have failed back to it) go now, unless a checkpoint replaced them.
        self.streams.started()

    def start_inference(self) -> None:
        """The sink and inference threads (`start` starts them; tests feeding the pipeline's
        side themselves start only these)."""
        if self.model is not None:
            self.streams.running()  # removed once a stop keeps the stream
        # The retained states of the assets installed so far, as the outbox keeps them (MQTT
        # queues them until it connects); those installed later go out on the sink thread.
        self.site.publish_restored()
        if self.sink is not None:
            self.sink.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        """Stops ingest, then finishes the windows already cut, then stops inference, then
        keeps every result inferred, then what is not scored yet for the next start
        (`stream_state`)."""
        self.sources.stop()
        self.pipeline.stop()
        if self.stop_inference() and not self.pipeline.running:
            self._keep_streams()

    def stop_inference(self) -> bool:
        """Inference finishes the windows queued, the sink decides and keeps every result;
        False when either is stuck (its deciders and queue are still in use)."""
        if self.worker is None or self.sink is None:
            return True
        self.worker.stop()
        # Also when inference is stuck: what it inferred is in the sink's queue.
        self.sink.stop()
        if self.worker.running:
            log.error("inference did not stop in time; the stream is not kept")
            return False
        if self.sink.running:
            log.error("the sink did not finish in time; the stream is not kept")
            return False
        return True

    def _keep_streams(self) -> None:
        model, decisions = self.model, self.decisions
        if model is None or decisions is None:
            return
        kept = True
        for runner in self.runners:
            state = runner.snapshot()
            decider = decisions.deciders[runner.index]
            if decider is not None:
                state |= decider.snapshot()
            kept &= self.streams.save(runner.name, model.version, model.schema.names, state)
        if kept:
            self.streams.stopped()

    def checkpoint_streams(self) -> None:
        """On the pipeline thread, every `ingest.checkpoint_s`: each asset's stream that moved
        since (open slots, window ring, calibration rows; not the deciders', which the sink
        thread owns), so a kill -9 resumes from at most that long ago."""
        every, model = self.config.ingest.checkpoint_s, self.model
        now = self.clock()
        if model is None or not every or now - self._checkpointed_at < every:
            return
        self._checkpointed_at = now
        for runner in self.runners:
            mark = (id(runner.aligner), runner.aligner.readings)
            if self._checkpointed.get(runner.index) == mark:
                continue
            try:
                state = runner.snapshot()
                self.streams.write(runner.name, model.version, model.schema.names, state)
            except OSError as exc:
                if now - self._checkpoint_failed_at >= 60.0:
                    self._checkpoint_failed_at = now
                    log.error(
                        "cannot keep the stream of %s (%s): a kill -9 would lose more of it",
                        runner.name,
                        exc,
                    )
                continue
            self._checkpointed[runner.index] = mark

    def _resume_stream(self, runner: AssetRunner) -> None:
        model, decisions = self.model, self.decisions
        assert model is not None and decisions is not None
        # Kept on disk until a checkpoint replaces it: a crash-loop faster than checkpoint_s
        # must not lose it (without checkpoints it would be a stale stop's: removed).
        keep = self.config.ingest.checkpoint_s > 0
        state = self.streams.take(runner.name, model.version, model.schema.names, keep)
        if state is None:
            return
        try:
            runner.restore(state)
            decider = decisions.deciders[runner.index]
            if decider is not None:
                decider.restore(state)
        except Exception as exc:  # noqa: BLE001 - a state file is disk input: never fatal
            log.warning("stream state of %s not resumed (%r)", runner.name, exc)
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
            "pipeline": self.pipeline.running,
            "mqtt": mqtt_thread is not None and mqtt_thread.is_alive(),
        }
        if self.worker is not None:
            alive["inference"] = self.worker.running
        if self.sink is not None:
            alive["sink"] = self.sink.running
        alive.update(self.sources.threads_alive())
        return alive

    # ---- the inference thread's other work ----
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

    def start_calibration(self, runner: AssetRunner, series: AlignedSeries) -> None:
        """Calibrates on the inference thread (the only one that calls the backend), installs
        the asset's decider on the sink thread (after the results before it), and waits for
        both, so the rows after the calibration stretch are all scored. Waits at most
        `decisions.calibration_timeout_s`: past it the calibration fails (logged, counted),
        a late result is discarded, and the asset collects its rows again; while one given up
        is still pending (inference stuck) none is started: it would wait behind it. Where
        it does not calibrate, the runner is told why (it says so now and then, and backs
        off after failures: `CalibrationRows`). While the outbox keeps an alert open on the
        asset (raised before a restart onto a new version, or one whose calibration is lost),
        it does not calibrate: its rows may be the fault's, and a decider fitted on them would
        clear the alert; the alert stays open, the rows are dropped, and the log says so."""
        model, worker, sink = self.model, self.worker, self.sink
        assert model is not None and worker is not None and sink is not None
        decisions = self.decisions
        assert decisions is not None
        kept = self.kept_open(runner.name)
        if kept is not None:
            # Its rows are the fault's (or may be): fitted on them, the fault would be the
            # asset's normal and the alert cleared by it. The alert stays open, for at most
            # OPEN_ALERT_CALIBRATION_WAIT_S: nothing on the agent closes it otherwise, and an
            # asset never scored again (the fault repaired meanwhile) is worse.
            now = self.clock()
            since = self._calibration_waits.setdefault(runner.name, now)
            if now - since < OPEN_ALERT_CALIBRATION_WAIT_S:
                runner.calibration_not_done(
                    f"waits: alert {kept.key} is open on it (raised at {kept.raised_at:.0f}); "
                    "it is not fitted on rows taken while a fault may go on: the alert stays "
                    "open and the asset is not scored, for at most "
                    f"{OPEN_ALERT_CALIBRATION_WAIT_S / 3600:.0f} h",
                    tried=False,
                )
                return
            log.warning(
                "calibrating %s although alert %s is still open on it after %.0f h: the rows "
                "may be the fault's, and the alert is cleared if the new calibration takes "
                "them for normal",
                runner.name,
                kept.key,
                (now - since) / 3600,
                extra=ids(asset=runner.name, alert=kept.key),
            )
        self._calibration_waits.pop(runner.name, None)
        with self._given_up_lock:
            pending = self._calibrations_given_up
        if pending:
            runner.calibration_not_done(
                f"is not started: {pending} given up is still pending on the inference "
                "thread (stuck?)",
                tried=False,
            )
            return
        bound = self.config.decisions.calibration_timeout_s
        done = threading.Event()
        outcome = CalibrationOutcome()

        def install(cal: SiteCalibration, seed: list[float]) -> None:
            try:
                with outcome.lock:  # installed or given up, never both
                    if outcome.given_up:
                        log.warning("the late calibration of %s is discarded", runner.name)
                        return
                    decisions.install(runner, cal, seed)
                    outcome.installed = True
            finally:
                done.set()
                self._ended(outcome)

        def task(backend: InferenceBackend) -> None:
            handed = False
            try:
                if outcome.given_up:
                    return
                cal, raw, _, _ = calibrate(backend, model.frame, series, series.slots)
                keep = max(0, model.frame.decision.smoothing - 1)
                seed = [float(x) for x in raw[raw.size - keep :]] if keep else []
                if outcome.given_up:
                    log.warning("the late calibration of %s is discarded", runner.name)
                    return
                self._save_calibration(runner, cal, seed)
                log.info("calibrated %s on %d rows", runner.name, series.slots)
                sink.call(lambda: install(cal, seed))
                handed = True
            except AutoglmError as exc:  # said by the runner, now and then
                outcome.error = str(exc)
            finally:
                if not handed:
                    done.set()
                    self._ended(outcome)

        started = time.monotonic()
        worker.submit(task)
        if done.wait(bound):
            if outcome.error:
                runner.calibration_not_done(f"failed ({outcome.error})", tried=True)
            return
        with outcome.lock:
            if outcome.installed or outcome.ended:
                return  # finished as the bound passed: not a failure
            outcome.given_up = True
            with self._given_up_lock:
                self._calibrations_given_up += 1
        self.counters.calibration_timeouts += 1
        log.error(
            "the calibration of %s did not finish within %.0f s (decisions."
            "calibration_timeout_s; inference stuck or too slow?): it failed, its %d rows "
            "are collected again, and no calibration starts until it ends",
            runner.name,
            time.monotonic() - started,
            series.slots,
        )
        runner.calibration_not_done(f"did not finish within {bound:.0f} s", tried=True)

    def _ended(self, outcome: CalibrationOutcome) -> None:
        """A calibration's task or install is over: one given up no longer holds others."""
        with outcome.lock:
            if outcome.ended:
                return
            outcome.ended = True
            if outcome.given_up:
                with self._given_up_lock:
                    self._calibrations_given_up -= 1

    def _save_calibration(
        self, runner: AssetRunner, cal: SiteCalibration, seed: list[float]
    ) -> None:
        model = self.model
        assert model is not None
        try:
            self.calibrations.save(model.version, runner.name, model.schema.names, cal, seed)
        except OSError as exc:  # disk full: alert on it anyway, calibrate again later
            log.error(
                "cannot keep the calibration of %s (%s); it serves from memory and is "
                "redone after a restart",
                runner.name,
                exc,
            )

    # ---- health ----
    def drift(self) -> dict[str, agent_pb2.AssetDrift]:
        """Model health of each calibrated asset (`edge_agent/drift.py`)."""
        return drift_of(self)

    def health(self, disk_free: int, rates_since_last: bool = True) -> agent_pb2.AgentHealth:
        """The health report. `rates_since_last`: ingest rates since the previous such call
        (the heartbeat's); False (a metrics scrape) leaves them out and the mark alone."""
        rates = self._rates.since_last(self.runners) if rates_since_last else {}
        return health_of(self, disk_free, rates)
