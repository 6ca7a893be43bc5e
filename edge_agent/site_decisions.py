"""Each asset's decider fed from inference outputs: its verdicts, its alerts on site, and the
records to keep for the control plane (predictions, alert events, window captures).

Runs on the sink thread (`sink.py`), which owns everything here: the deciders, the score
trails drift is measured on, the capture sampler's budget and the site's held alerts. After an
unclean stop it also skips the windows the killed agent had already kept and counts those it
never scored (`resume`).

The alerts open on each asset are kept by the outbox in the transaction that keeps their
events (`open_state`), and the site hears of an event only after that write (`publish_site`):
a kill at any point leaves the outbox's events, its open alerts and what the site saw in
agreement, so the control plane gets a raise exactly when it will get the clear.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from edge_agent.asset_stream import AssetRunner
from edge_agent.batching import WindowJob
from edge_agent.calibration import (
    SiteCalibration,
    WindowOutputs,
    evidence_values,
    score_of,
    sensor_evidence,
)
from edge_agent.capture import CaptureSampler, captured
from edge_agent.config import AgentConfig
from edge_agent.decisions import AlertEvent, AssetDecider, Verdict
from edge_agent.drift import ScoreTrail
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import UNCLEAN_STOP, LossLog
from edge_agent.open_alerts import OpenAlerts, encode_alert
from edge_agent.outbox import ALERT, CAPTURE, PREDICTION
from edge_agent.scoring import window_statistics
from edge_agent.serving import ServingModel
from edge_agent.site_alerts import SiteAlerts
from edge_agent.wire import alert_record, capture_record, prediction_record

log = logging.getLogger(__name__)
Records = list[tuple[int, bytes]]
# What the site hears once the records are kept: an alert event, or a window decided (a held
# raise whose maintenance period ended is published then).
SiteAction = tuple[AlertEvent, None] | tuple[str, float]


class SiteDecisions:
    """The assets' deciders on one model, and what their verdicts set off."""

    def __init__(
        self,
        config: AgentConfig,
        model: ServingModel,
        runners: Sequence[AssetRunner],
        site: SiteAlerts,
        open_alerts: OpenAlerts,
        capture: CaptureSampler,
        counters: RuntimeCounters,
        losses: LossLog,
        kept_open: Callable[[str], AlertEvent | None] = lambda _: None,
    ) -> None:
        self.config = config
        self.model = model
        self.runners = runners
        self.site = site
        self.open_alerts = open_alerts  # the marks of raises held back (maintenance)
        self.kept_open = kept_open  # by asset: the alert the outbox keeps open
        self._site_actions: list[SiteAction] = []
        self._encoded: dict[str, tuple[AlertEvent, str]] = {}
        self.capture = capture
        self.counters = counters
        self.deciders: list[AssetDecider | None] = [None] * len(runners)
        self.trails = [ScoreTrail() for _ in runners]
        self._kept_every: Counter[int] = Counter()
        self.losses = losses
        self.errors = 0  # windows whose decision failed (logged)
        # By asset name: the end of the last window decided, kept with the records (outbox),
        # and by asset index its stream's clock steps then (a later step voids the mark).
        self.decided_through: dict[str, float] = {}
        self._steps_at_mark: dict[int, int] = {}
        # By asset index, after an unclean stop: the end of the last window the killed agent
        # kept; windows up to it are not decided again, the first after it counts the gap.
        self._resume_after: dict[int, float] = {}
        self.rescored_skipped: Counter[int] = Counter()  # by asset index

    def resume(self, runner: AssetRunner, kept_through: float) -> None:
        """After an unclean stop: `runner`'s windows ending at or before `kept_through` were
        decided and kept by the killed agent."""
        self._resume_after[runner.index] = kept_through
        self.decided_through[runner.name] = kept_through
        self._steps_at_mark[runner.index] = runner.clock_steps

    def marks(self) -> dict[str, float | None]:
        """By asset, the end of the last window decided (kept with the records: after a kill
        -9 the windows up to it are not decided again); None for an asset whose stream
        restarted at a clock step since (its next windows are of the new time)."""
        marks: dict[str, float | None] = dict(self.decided_through)
        for runner in self.runners:
            steps = self._steps_at_mark.get(runner.index)
            if steps is not None and runner.clock_steps != steps:
                marks[runner.name] = None
        return marks

    def install(self, runner: AssetRunner, cal: SiteCalibration, seed: list[float]) -> None:
        """The asset's decider on `cal` (before the sink thread runs, or on it)."""
        model = self.model
        prior = self.deciders[runner.index]
        if prior is not None:  # calibrated again: the alert open stays open
            still_open = prior.open
        else:
            still_open = self.kept_open(runner.name)
            if still_open is not None and self.open_alerts.is_held(runner.name):
                self.site.held[runner.name] = still_open  # not published yet: a period covered it
            # The site may not have heard of the last alert event the outbox kept (killed in
            # between): its retained state is published again as the outbox has it.
            self.site.restore_state(runner.name, still_open)
        self.deciders[runner.index] = AssetDecider(
            runner.name,
            model.schema.names,
            self.config.decisions.at_least(model.frame.decision.alert_windows),
            model.frame.decision.smoothing,
            model.version,
            seed,
            still_open,
        )
        runner.calibration = cal  # last: the pipeline thread starts cutting windows after it

    def decide(
        self, jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict], records: Records
    ) -> None:
        """One batch's verdicts (appended to `verdicts`), site alerts and records to keep
        (appended to `records` as they come: a window whose decision fails is logged and
        counted, and loses neither the records before it nor the windows after it)."""
        frame = self.model.frame
        windows = np.stack([job.window for job in jobs])
        masks = np.stack([job.mask for job in jobs])
        level, spread, before = window_statistics(frame, windows, masks)
        out = WindowOutputs(*outputs, level=level, spread=spread, before=before)
        for i, job in enumerate(jobs):
            try:
                self._decide_one(job, out.select(np.asarray([i])), verdicts, records)
            except Exception:
                self.errors += 1
                log.exception("the decision on a window of asset %d failed", job.asset)

    def _decide_one(
        self, job: WindowJob, one: WindowOutputs, verdicts: list[Verdict], records: Records
    ) -> None:
        model = self.model
        decision = model.frame.decision
        policy = self.config.decisions
        every = self.config.outbox.prediction_every
        decider = self.deciders[job.asset]
        cal = self.runners[job.asset].calibration
        if decider is None or cal is None:
            return
        if job.asset in self._resume_after and not self._resumed(job):
            return
        values = evidence_values(one, cal, decision)  # once, for the score and the sensors
        raw = float(score_of(values, decision)[0])
        evidence = sensor_evidence(one, cal, decision, values)
        verdict = decider.step(raw, evidence, job.window_start, job.window_end)
        self.counters.windows_scored += 1
        self.decided_through[decider.asset] = job.window_end
        self._steps_at_mark[job.asset] = self.runners[job.asset].clock_steps
        if verdict.event is not None:  # first: whatever fails next, the event is kept
            records.append((ALERT, alert_record(verdict.event)))
        raised = verdict.event is not None and verdict.event.kind == "raised"
        self.trails[job.asset].add(verdict.score, job.window_end, raised)
        self._site_actions.append((verdict.asset, job.window_end))
        if verdict.event is not None:
            self._site_actions.append((verdict.event, None))
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
        verdicts.append(verdict)

    def open_state(self) -> dict[str, str | None]:
        """By asset with a decider, its open alert as the outbox keeps it (None: none), kept
        with the records of the decisions so far."""
        state: dict[str, str | None] = {}
        for decider in self.deciders:
            if decider is None:
                continue
            event = decider.open
            if event is None:
                state[decider.asset] = None
                continue
            cached = self._encoded.get(decider.asset)
            if cached is None or cached[0] is not event:
                cached = self._encoded[decider.asset] = (event, encode_alert(event))
            state[decider.asset] = cached[1]
        return state

    def publish_site(self) -> None:
        """After the records of the decisions so far were written (or failed to be): their
        alert events on site, in order, and the held raises whose period ended."""
        try:  # first: the states of before these decisions
            self.site.publish_restored()
        except Exception:
            self.errors += 1
            log.exception("publishing the assets' retained states again on site failed")
        actions, self._site_actions = self._site_actions, []
        for first, second in actions:
            try:
                if isinstance(first, AlertEvent):
                    self.site.announce(first)
                elif self.site.held:
                    assert second is not None
                    self.site.release_held(first, second)
            except Exception:
                self.errors += 1
                log.exception("publishing an alert event of %s on site failed",
                              first.asset if isinstance(first, AlertEvent) else first)  # fmt: skip

    def _resumed(self, job: WindowJob) -> bool:
        """After an unclean stop: False for a window the killed agent already kept; for the
        first after those, counts the windows between that it never scored (health
        `unclean_stop`, a lost stretch for the heartbeat, a log line)."""
        after = self._resume_after[job.asset]
        spec = self.model.spec
        step = spec.stride * spec.period_s
        runner = self.runners[job.asset]
        name = runner.name
        if after - job.window_end > runner.aligner.far_s:
            # Far ahead of where the stream resumed (its checkpoint): a mark of before its
            # clock stepped back. Skipping up to it would decide nothing for that long.
            del self._resume_after[job.asset]
            log.warning(
                "%s resumed after an unclean stop at %.0f, %.0f s before the last window kept "
                "(its clock stepped back): every window is decided",
                name,
                job.window_end,
                after - job.window_end,
            )
            return True
        if job.window_end <= after + 1e-6 * step:
            self.rescored_skipped[job.asset] += 1
            return False
        del self._resume_after[job.asset]
        missing = max(0, round((job.window_end - after) / step) - 1)
        self.counters.unclean_stop_unscored += missing
        self.losses.gap(after + step, job.window_end - step, missing, UNCLEAN_STOP)
        skipped = self.rescored_skipped[job.asset]
        if not missing:
            log.info("%s resumed after an unclean stop: no window lost (%d kept not scored "
                     "again)", name, skipped)  # fmt: skip
            return True
        log.warning(
            "the previous run stopped uncleanly (kill -9, power loss): %d window(s) of %s "
            "ending %.0f to %.0f were never scored; %d it had kept were not scored again",
            missing,
            name,
            after + step,
            job.window_end - step,
            skipped,
        )
        return True
