"""The sink thread: inference results -> decisions, site alerts, window captures and the
outbox, so that the inference thread only infers.

The inference thread hands each batch's results over through a bounded queue and waits
while it is full: a sink that falls behind slows inference down, and then the pipeline thins
the windows it cuts (`pipeline.CATCH_UP_FROM`); nothing inferred is dropped. The sink takes
every batch waiting, decides them in order (`site_decisions.py`) and writes all their records
in one outbox transaction (group commit: one fsync for the lot instead of one per batch),
with the alerts then open on each asset, then publishes their alert events on site
(`after_keep`: only what was written, or failed to be, is told), then reports their verdicts.
What the decisions hold belongs to this thread; a site
calibration installs its decider here too (`call`), in order with the results around it.
A failure part-way (a decision, the write itself) never drops alert events silently: those
made before it are kept, or wait in memory for the next write; predictions that cannot be
written are counted as lost.
Where scoring got to (`scored`) is kept with the records; windows decided without records
(`outbox.prediction_every` keeps one in N) have it written on its own once it is
`mark_every_s` old, also when no result follows: a kill -9 then decides again at most that
long of windows (on the rows it lost) and counts the windows never scored right. At most one
such write every `mark_every_s`, whatever the rate.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from edge_agent.batching import WindowJob
from edge_agent.decisions import Verdict
from edge_agent.errors import LocalStateError
from edge_agent.health import RuntimeCounters
from edge_agent.inference.base import Outputs
from edge_agent.losses import LossLog
from edge_agent.outbox import ALERT, Outbox

log = logging.getLogger(__name__)

SINK_BACKLOG = 16  # batches of results waiting for the sink; past it inference waits
WAITING_ALERTS = 10_000  # alert events held in memory while the outbox cannot be written
MARK_EVERY_S = 5.0  # scoring marks unwritten at most this long (`ingest.checkpoint_s`'s default)
_STOP = None

Records = list[tuple[int, bytes]]
Results = tuple[Sequence[WindowJob], Outputs]
SinkTask = Callable[[], None]
# One batch's results -> its verdicts and the records to keep, appended to the lists given.
Decide = Callable[[Sequence[WindowJob], Outputs, list[Verdict], Records], None]


class ResultSink:
    """One thread between inference and the outbox (and the site's alert topics)."""

    def __init__(
        self,
        decide: Decide,
        outbox: Outbox,
        counters: RuntimeCounters,
        losses: LossLog,
        on_verdict: Callable[[Verdict], None] | None = None,
        backlog: int = SINK_BACKLOG,
        scored: Callable[[], Mapping[str, float | None]] | None = None,
        open_alerts: Callable[[], Mapping[str, str | None]] | None = None,
        after_keep: Callable[[], None] | None = None,
        mark_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.decide = decide  # `SiteDecisions.decide`
        # By asset, the end of the last window decided, and the alert open (`open_state`):
        # kept with the records they led to.
        self.scored = scored
        self.open_alerts = open_alerts
        self.after_keep = after_keep  # `SiteDecisions.publish_site`
        self.outbox = outbox
        self.counters = counters
        self.losses = losses  # when records were lost, for the heartbeat
        self.on_verdict = on_verdict
        self.backlog = backlog
        self.errors = 0
        self._queue: queue.Queue[Results | SinkTask | None] = queue.Queue(maxsize=backlog)
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        # Alert events the outbox could not take (disk full), oldest first: written first
        # when it can again. Bounded: past it the oldest are counted as lost.
        self._waiting_alerts: deque[tuple[int, bytes]] = deque(maxlen=WAITING_ALERTS)
        self._lost_logged_at = -math.inf
        self.mark_every_s = MARK_EVERY_S if mark_every_s is None else mark_every_s
        self._clock = clock
        self._marks_kept: dict[str, float | None] | None = None  # as last written
        self._marks_at = clock()  # when they were last written (or tried)
        self._unmarked = False  # windows decided since, their marks not written
        self._marks_logged_at = -math.inf

    # ---- any thread ----
    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, jobs: Sequence[WindowJob], outputs: Outputs) -> None:
        """A batch's results (the inference worker's result handler). Waits while `backlog`
        batches are waiting; raises instead when the sink thread is not running, so that the
        worker counts and logs the batch rather than hanging on it."""
        self._put((jobs, outputs))

    def call(self, task: SinkTask) -> None:
        """Runs `task` on the sink thread after the results already handed over."""
        self._put(task)

    def stop(self, timeout: float = 10.0) -> None:
        """Decides and keeps every result handed over so far, then stops."""
        if self.running:
            self._put(_STOP)
            self._thread.join(timeout)

    def _put(self, item: Results | SinkTask | None) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self.running:
                    raise RuntimeError("the sink thread is not running") from None

    # ---- sink thread ----
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                group = [self._queue.get(timeout=self._marks_due_in())]
            except queue.Empty:  # idle, with windows decided since the marks were written
                if self._marks_due_in() == 0.0:
                    self._keep_marks()
                continue
            while len(group) < self.backlog:  # everything waiting: one transaction
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in group)
            try:
                self._handle(group)
            except Exception:
                self.errors += 1
                log.exception("the sink failed on %d waiting item(s)", len(group))
        if self._waiting_alerts:  # a last try: the disk may have space again
            self._keep([])
            if self._waiting_alerts:
                log.error(
                    "%d alert event(s) could not be written before stopping (disk full); "
                    "they were published on site but will not reach the control plane",
                    len(self._waiting_alerts),
                )

    def _marks_due_in(self) -> float | None:
        """How long the sink may wait for results before writing the marks (None: forever)."""
        if not self._unmarked:
            return None
        return max(0.0, self._marks_at + self.mark_every_s - self._clock())

    def _handle(self, group: list[Results | SinkTask | None]) -> None:
        records: Records = []
        verdicts: list[Verdict] = []
        for item in group:
            if item is _STOP:
                continue
            if callable(item):
                self._task(item)
                continue
            assert isinstance(item, tuple)
            self._unmarked = True
            try:  # what it appended before failing (alert events first) is kept
                self.decide(*item, verdicts, records)
            except Exception:
                self.errors += 1
                log.exception("decisions on a batch of %d windows failed", len(item[0]))
        if records or self._waiting_alerts:
            self._keep(records)
        elif self._marks_due_in() == 0.0:
            self._keep_marks()
        if self.after_keep is not None:  # the site hears only of what was kept (or failed)
            try:
                self.after_keep()
            except Exception:
                self.errors += 1
                log.exception("publishing alert events on site failed")
        if self.on_verdict is not None:  # once their records are kept
            for verdict in verdicts:
                self.on_verdict(verdict)

    def _task(self, task: SinkTask) -> None:
        try:
            task()
        except Exception:
            self.errors += 1
            log.exception("sink task failed")

    def _keep(self, records: Records) -> None:
        """Into the outbox, in one transaction, alert events kept in memory first. When it
        cannot be written (disk full, or any other failure of the write) the data path goes
        on (site alerts are already published): alert events wait in a bounded queue in
        memory and are written first at the next write; predictions are counted as lost
        (heartbeat: dropped_by_reason outbox_write_failed and a lost stretch), said once a
        minute."""
        waiting = len(self._waiting_alerts)
        if waiting:
            records = [*self._waiting_alerts, *records]
        try:
            scored = self.scored() if self.scored is not None else None
            if self.open_alerts is None:
                self.outbox.append(records, scored)
            else:
                self.outbox.append(records, scored, self.open_alerts())
        except LocalStateError as exc:
            self._not_kept(records, str(exc))
            return
        except Exception as exc:  # not storage: a bug or a damaged record; still counted
            self.errors += 1
            log.exception("writing %d record(s) to the outbox failed", len(records))
            self._not_kept(records, f"the outbox write failed ({exc!r})")
            return
        self.losses.written()
        self._marks_written(scored)
        if waiting:
            log.info("%d alert event(s) kept in memory are in the outbox now", waiting)
            self._waiting_alerts.clear()

    def _marks_written(self, scored: Mapping[str, float | None] | None) -> None:
        self._marks_kept = None if scored is None else dict(scored)
        self._marks_at = self._clock()
        self._unmarked = False

    def _keep_marks(self) -> None:
        """The scoring marks on their own (windows decided without records). A failure
        (disk full) is said once a minute and tried again `mark_every_s` later."""
        self._marks_at = self._clock()
        if self._waiting_alerts:  # never ahead of alert events of the windows they mark
            self._keep([])
            return
        if self.scored is None:
            self._unmarked = False
            return
        try:
            scored = self.scored()
            if scored != self._marks_kept:
                self.outbox.append([], scored)
        except Exception as exc:  # noqa: BLE001 - storage or not: the data path goes on
            if not isinstance(exc, LocalStateError):
                self.errors += 1
            now = time.monotonic()
            if now - self._marks_logged_at >= 60.0:
                self._marks_logged_at = now
                log.error("the scoring marks could not be written (%s); a kill -9 now would "
                          "decide windows again", exc)  # fmt: skip
            return
        self._marks_written(scored)

    def _not_kept(self, records: Records, cause: str) -> None:
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
                "%s; %d record(s) lost so far, %d alert event(s) wait in memory (free disk space)",
                cause,
                self.counters.outbox_write_failed,
                len(self._waiting_alerts),
            )
