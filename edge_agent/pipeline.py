"""The pipeline thread: decoded readings -> aligned grid rows -> windows for inference.

It owns the assets' aligners and window rings. It meets paho's thread (and the other
sources') in the fair queue of decoded readings, and the inference thread in the worker's
queue; behind, it thins the windows it hands on instead of queueing them without bound.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from edge_agent.asset_stream import AssetRunner
from edge_agent.batching import InferenceWorker, WindowBatch
from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.health import RuntimeCounters
from edge_agent.ingest.decode import Chunk, Decoded, Decoder
from edge_agent.ingest.fair_queue import FairQueue
from edge_agent.windowing import AlignedSeries

log = logging.getLogger(__name__)
_DRAIN = 5000
# After a drain, the pipeline thread lets readings gather this long before the next one: one
# wake-up per few milliseconds of messages instead of one per message (the thread switch cost
# more than the message); a reading waits at most this much longer.
_GATHER_S = 0.002
_TRIM_LOG_S = 60.0  # an asset trimmed of readings waiting for their time: logged this often
CATCH_UP_FROM = 8  # batches' worth of windows waiting: inference is behind

StartCalibration = Callable[[AssetRunner, AlignedSeries], None]


class Pipeline:
    """The pipeline thread of one runtime: readings in (`queue.put`), windows out."""

    def __init__(
        self,
        assets: Sequence[AssetConfig],
        ingest: IngestLimits,
        decoder: Decoder,
        runners: Sequence[AssetRunner],
        worker: InferenceWorker | None,
        max_batch: int,
        counters: RuntimeCounters,
        start_calibration: StartCalibration,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.assets = assets
        self.ingest = ingest
        self.decoder = decoder
        self.runners = runners
        self.worker = worker
        self.max_batch = max_batch
        self.counters = counters
        self.start_calibration = start_calibration
        self.checkpoint = checkpoint  # called between drains: keeps the stream now and then
        self.queue = FairQueue(
            len(assets), ingest.max_backlog_readings, self._backlog_full, ingest.backlog_block_s
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._cut_count: Counter[int] = Counter()  # windows cut per asset while behind
        self._behind_logged_at = -math.inf
        self._trim_logged_at = -math.inf

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Aligns what is queued, then stops (waits at most `timeout`)."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _backlog_full(self, asset: int, readings: int) -> None:
        name = self.assets[asset].name
        self.decoder.drop("backlog_full", name, f"{readings} readings", readings)

    def _run(self) -> None:
        while True:
            items = self.queue.take(_DRAIN, timeout=0.1)  # one per asset in turn
            if self.checkpoint is not None:
                try:
                    self.checkpoint()
                except Exception:
                    self.counters.errors += 1
                    log.exception("keeping the stream state failed")
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
            for index in touched:
                try:
                    self._advance(index)
                except Exception:
                    # One asset's stream must not stop the others': it starts afresh.
                    self.counters.errors += 1
                    name = self.runners[index].name
                    log.exception("pipeline failed on %s's rows; its stream restarts", name)
                    self.runners[index].reset_stream()
            if len(items) < _DRAIN:
                time.sleep(_GATHER_S)

    def _advance(self, index: int) -> None:
        """Closes the asset's grid slots that are ready and feeds their rows on."""
        runner = self.runners[index]
        self.follow_clock(runner)
        now = time.time() + max(0.0, self.decoder.clock_offset(index))
        while (rows := runner.aligner.close_ready(now)) is not None:
            runner.feed(rows, self.emit, self.start_calibration)
        aligner = runner.aligner
        ahead = (self.ingest.max_future_s + aligner.lateness) / aligner.period
        if aligner.trim(max(self.ingest.max_backlog_readings, 2 * int(ahead))):
            self._trimmed(runner.name)

    def _trimmed(self, name: str) -> None:
        now = time.monotonic()
        if now - self._trim_logged_at >= _TRIM_LOG_S:
            self._trim_logged_at = now
            log.warning(
                "%s: a sensor's readings waiting for their time (stamped ahead) span more "
                "slots than ingest.max_backlog_readings or twice those of "
                "ingest.max_future_s; the newest are dropped (backlog_full)",
                name,
            )

    def _add(self, item: Decoded, touched: set[int]) -> None:
        if isinstance(item, tuple):
            asset, sensor, ts, value = item
            self.runners[asset].aligner.add(sensor, ts, value)
            touched.add(asset)
            return
        head = item[0]
        if len(item) > 1 and all(c.ts is head.ts and c.asset == head.asset for c in item):
            # One message's sensors at shared times (the decoder's arrays form): at once.
            aligner = self.runners[head.asset].aligner
            aligner.add_block([c.sensor for c in item], head.ts, [c.values for c in item])
            touched.add(head.asset)
            return
        for chunk in item:
            assert isinstance(chunk, Chunk)
            self.runners[chunk.asset].aligner.add_many(chunk.sensor, chunk.ts, chunk.values)
            touched.add(chunk.asset)

    def follow_clock(self, runner: AssetRunner) -> None:
        """After each drain: the asset's stream clock, as the decoder estimates it."""
        runner.follow_clock(self.decoder.clock_offset(runner.index))

    def emit(self, batch: WindowBatch) -> None:
        """Queues windows for inference. Behind (a backlog replayed after an outage, a model
        slower than the stream, a sink slower than inference), it catches up instead of
        queueing without bound: with `CATCH_UP_FROM` batches' worth of windows waiting, only
        every 2nd window of each asset is scored, every 4th at twice that, and so on (at most
        every 64th); the skipped ones are counted (`behind_skipped` in health and /metrics)
        and said once a minute."""
        worker = self.worker
        assert worker is not None
        limit = CATCH_UP_FROM * max(1, self.max_batch)
        waiting = worker.waiting
        if waiting + len(batch) > limit:
            batch = self._thin(batch, waiting, limit)
        if len(batch):
            worker.submit(batch)

    def _thin(self, batch: WindowBatch, waiting: int, limit: int) -> WindowBatch:
        """The windows of `batch` kept while `waiting` (and those kept before them) are over
        `limit`; window by window, as if each were queued on its own."""
        count = self._cut_count
        asset = batch.asset
        kept: list[int] = []
        for i in range(len(batch)):
            behind = (waiting + len(kept)) // limit
            if not behind:
                kept.append(i)
                continue
            every = 1 << min(6, behind)
            count[asset] += 1
            if count[asset] % every:
                self.counters.behind_skipped += 1
            else:
                kept.append(i)
        skipped = len(batch) - len(kept)
        if skipped:
            now = time.monotonic()
            if now - self._behind_logged_at >= 60.0:
                self._behind_logged_at = now
                log.warning(
                    "inference is behind (%d windows waiting): scoring every %dth window "
                    "of each asset until it catches up; %d skipped so far",
                    waiting,
                    1 << min(6, max(1, waiting // limit)),
                    self.counters.behind_skipped,
                )
        if len(kept) == len(batch):
            return batch
        return batch.subset(kept)
