"""One agent data path without the MQTT socket (aligner, runner, inference thread, decider,
outbox) on a state directory, fed readings directly; and pump readings like the training
data's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.batching import WindowBatch
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.decisions import AlertEvent, Verdict
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.agents import wait_for
from tests.support.sensordata import SENSORS

START = 1_700_000_000.0


def pump(rows: int, faulty: bool, seed: int) -> np.ndarray:
    """Readings like the training data's; `faulty`: the flow drops, the vibration rises."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    load = np.sin(2 * np.pi * t / 40) + 0.1 * rng.standard_normal(rows)
    x = np.stack(
        [
            10 + load + 0.1 * rng.standard_normal(rows),
            3 + 0.5 * load + 0.05 * rng.standard_normal(rows),
            1 + 0.2 * load + 0.02 * rng.standard_normal(rows),
            0.2 + 0.01 * rng.standard_normal(rows),
        ],
        axis=1,
    )
    if faulty:
        x[:, 0] -= 2.5
        x[:, 3] += 0.15
    return x


def site_config(tmp_path: Path, bundle: Path, **extra: object) -> AgentConfig:
    """One asset, pump-1, serving `bundle` from `tmp_path/agent`."""
    return load_agent_config(
        None,
        {
            "state_dir": tmp_path / "agent",
            "assets": [{"name": "pump-1", "topics": ["plant/pump-1/+"]}],
            "model": {"bundle": bundle},
            **extra,
        },
    )


class Site:
    """One agent data path (everything but the MQTT socket) on a state directory."""

    def __init__(self, config: AgentConfig, bundle: Path, key: object, tmp: Path) -> None:
        self.model = open_serving(bundle, key, config.model, tmp / "m", tmp / "e")  # type: ignore[arg-type]
        self.verdicts: list[Verdict] = []
        self.jobs = 0
        outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
        self.runtime = EdgeRuntime(config, self.model, outbox, "t", self.verdicts.append)
        self.outbox = outbox
        assert self.runtime.worker is not None
        self.runtime.start_inference()

    def feed(self, values: np.ndarray, first_row: int, step: float = 1.0) -> None:
        """Readings at START + first_row + i * step seconds, as the pipeline thread adds them."""
        runner = self.runtime.runners[0]

        def emit(batch: WindowBatch) -> None:
            self.jobs += len(batch)
            self.runtime.pipeline.emit(batch)

        for i in range(values.shape[0]):
            for j in range(len(SENSORS)):
                if not np.isnan(values[i, j]):  # NaN: no reading (the decoder drops them)
                    runner.aligner.add(j, START + first_row + i * step, values[i, j])
            self.runtime.pipeline.follow_clock(runner)  # as the pipeline does after each drain
            while (closed := runner.aligner.close_ready()) is not None:
                runner.feed(closed, emit, self.runtime.start_calibration)
        self._wait_scored()

    def feed_block(self, values: np.ndarray, first_row: int, rows_per_message: int) -> None:
        """The same readings as `feed`, `rows_per_message` rows of every sensor per message
        (as a gateway batches them): `add_many` per sensor, then the drain."""
        runner = self.runtime.runners[0]

        def emit(batch: WindowBatch) -> None:
            self.jobs += len(batch)
            self.runtime.pipeline.emit(batch)

        for a in range(0, values.shape[0], rows_per_message):
            block = values[a : a + rows_per_message]
            ts = START + first_row + a + np.arange(block.shape[0], dtype=np.float64)
            for j in range(len(SENSORS)):
                present = ~np.isnan(block[:, j])
                runner.aligner.add_many(j, ts[present], block[present, j].astype(np.float64))
            self.runtime.pipeline.follow_clock(runner)
            while (closed := runner.aligner.close_ready()) is not None:
                runner.feed(closed, emit, self.runtime.start_calibration)
        self._wait_scored()

    def _wait_scored(self) -> None:
        """Until every window cut is scored, or skipped because inference fell behind (a
        busy machine: the runtime then scores every 2nd window and counts the rest)."""
        counters, decisions = self.runtime.counters, self.runtime.decisions
        assert decisions is not None
        # ... or not decided again after a kill (the killed run had kept them).
        wait_for(
            lambda: (
                len(self.verdicts)
                + counters.behind_skipped
                + sum(decisions.rescored_skipped.values())
                == self.jobs
            ),
            timeout=120,
        )

    def events(self) -> list[AlertEvent]:
        return [v.event for v in self.verdicts if v.event is not None]

    def stop(self, graceful: bool = False) -> None:
        """As a kill would leave it (nothing flushed or cleared on the way out), or as a
        graceful stop: the unscored stream kept for the next start."""
        assert self.runtime.worker is not None
        self.runtime.stop_inference()
        if graceful:
            self.runtime._keep_streams()
        self.outbox.close()
        self.model.close()
