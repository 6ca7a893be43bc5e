"""Outbox transactions (each one fsync) under a burst: 64 assets each deliver `--rows` rows at
once (a backlog after a short outage), through the agent's real runtime (a small model
trained here, site calibration on the first rows), fed as the pipeline thread feeds it.

Before the sink thread, every inference batch with records was its own transaction; the sink
writes the batches waiting for it together. Prints inference batches, transactions, records
and fsyncs per batch and per window, for each round.

    python tests/benchmarks/bench_sink.py [--rows 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge_agent.config import load_agent_config
from edge_agent.decisions import Verdict
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.bundles import train_small
from tests.support.datapath import START, pump

ASSETS = 64


class CountingOutbox(Outbox):
    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 28)
        self.appends: list[int] = []

    def append(
        self,
        records: Sequence[tuple[int, bytes]],
        scored: Mapping[str, float | None] | None = None,
        open_alerts: Mapping[str, str | None] | None = None,
    ) -> list[int]:
        self.appends.append(len(records))
        return super().append(records, scored, open_alerts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=7, help="rows per asset in one burst")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle, key = train_small(root / "model")
        assets = [{"name": f"pump-{i}", "topics": [f"plant/pump-{i}/+"]} for i in range(ASSETS)]
        config = load_agent_config(
            None, {"state_dir": root / "agent", "assets": assets, "model": {"bundle": bundle}}
        )
        model = open_serving(bundle, key.public_key(), config.model, root / "m", root / "e")
        outbox = CountingOutbox(root / "outbox.sqlite3")
        verdicts: list[Verdict] = []
        runtime = EdgeRuntime(config, model, outbox, "bench", verdicts.append)
        worker = runtime.worker
        assert worker is not None
        runtime.start_inference()

        def burst(first: int, rows: int, seed: int) -> None:
            ts = START + first + np.arange(rows, dtype=np.float64)
            for runner in runtime.runners:
                x = pump(rows, faulty=False, seed=seed + runner.index)
                for j in range(x.shape[1]):
                    runner.aligner.add_many(j, ts, x[:, j].astype(np.float64))
            for runner in runtime.runners:
                while (closed := runner.aligner.close_ready()) is not None:
                    runner.feed(closed, runtime.pipeline.emit, runtime.start_calibration)

        def settle() -> None:
            seen = -1
            while seen != len(verdicts) or worker.waiting:
                seen = len(verdicts)
                time.sleep(0.5)

        first = model.manifest.calibration_rows + 10
        burst(0, first, 0)  # calibrated, scoring
        settle()
        print(f"{ASSETS} assets, bursts of {args.rows} rows each, max batch "
              f"{config.batching.max_batch}")  # fmt: skip
        for r in range(args.rounds):
            windows, batches, appends = len(verdicts), worker.batches, len(outbox.appends)
            skipped = runtime.counters.behind_skipped
            burst(first, args.rows, 1000 * (r + 1))
            first += args.rows
            settle()
            windows = len(verdicts) - windows
            batches = worker.batches - batches
            txns = outbox.appends[appends:]
            print(
                f"round {r + 1}: {windows} windows ({runtime.counters.behind_skipped - skipped} "
                f"skipped), {batches} inference batches, {len(txns)} outbox transactions "
                f"({sum(txns)} records): {len(txns) / max(batches, 1):.2f} fsyncs per batch "
                f"(up to 1.00 before the sink thread), {len(txns) / max(windows, 1):.4f} per window"
            )
        runtime.stop_inference()
        outbox.close()
        model.close()


if __name__ == "__main__":
    main()
