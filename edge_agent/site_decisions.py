"""Each asset's decider fed from inference outputs: its verdicts, its alerts on site, and the
records to keep for the control plane (predictions, alert events, window captures).

Runs on the sink thread (`sink.py`), which owns everything here: the deciders, the score
trails drift is measured on, the capture sampler's budget and the site's held alerts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

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
from edge_agent.decisions import AssetDecider, Verdict
from edge_agent.drift import ScoreTrail
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.open_alerts import OpenAlerts
from edge_agent.outbox import ALERT, CAPTURE, PREDICTION
from edge_agent.scoring import window_statistics
from edge_agent.serving import ServingModel
from edge_agent.site_alerts import SiteAlerts
from edge_agent.wire import alert_record, capture_record, prediction_record

Records = list[tuple[int, bytes]]


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
    ) -> None:
        self.config = config
        self.model = model
        self.runners = runners
        self.site = site
        self.open_alerts = open_alerts
        self.capture = capture
        self.counters = counters
        self.deciders: list[AssetDecider | None] = [None] * len(runners)
        self.trails = [ScoreTrail() for _ in runners]
        self._kept_every: Counter[int] = Counter()

    def install(self, runner: AssetRunner, cal: SiteCalibration, seed: list[float]) -> None:
        """The asset's decider on `cal` (before the sink thread runs, or on it)."""
        model = self.model
        still_open = self.open_alerts.load(runner.name)
        if still_open is not None and self.open_alerts.is_held(runner.name):
            self.site.held[runner.name] = still_open  # not published yet: a period covered it
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
        self, jobs: Sequence[WindowJob], outputs: Outputs, verdicts: list[Verdict]
    ) -> Records:
        """One batch's verdicts (appended to `verdicts`), site alerts and records to keep."""
        model = self.model
        frame = model.frame
        decision = frame.decision
        policy = self.config.decisions
        every = self.config.outbox.prediction_every
        windows = np.stack([job.window for job in jobs])
        masks = np.stack([job.mask for job in jobs])
        level, spread, before = window_statistics(frame, windows, masks)
        out = WindowOutputs(*outputs, level=level, spread=spread, before=before)
        records: Records = []
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
        return records
