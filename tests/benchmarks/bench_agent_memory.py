"""Agent memory with 64 assets fed single readings: the process's RSS, and what one row of
an asset's history costs in memory next to the row's own data (4 sensors x (8 B timestamp
+ 8 B value) = 64 B), through the agent's real runtime (a small model trained here,
inference running).

    python tests/benchmarks/bench_agent_memory.py [--history-rows 3000] [--tracemalloc]

Each asset's readings arrive one sensor reading at a time, as single MQTT readings reach the
aligner; every closed row is fed to the asset's runner (windows, inference, row history).
RSS is read after the runtime is built, after the history is half full and after it is full;
the growth between the last two, per row and asset, is what a row of history costs resident
(the history's arrays are allocated up front, and their pages become resident as rows are
written). With --tracemalloc the Python allocations that grew over the same stretch are
listed by line (it slows the run several times).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
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
DATA_BYTES_PER_READING = 16  # a float64 timestamp and a float64 value


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history-rows", type=int, default=3000, help="shadow.history_rows")
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle, key = train_small(root / "model")
        assets = [{"name": f"pump-{i}", "topics": [f"plant/pump-{i}/+"]} for i in range(ASSETS)]
        config = load_agent_config(
            None,
            {
                "state_dir": root / "agent",
                "assets": assets,
                "model": {"bundle": bundle},
                "shadow": {"history_rows": args.history_rows},
            },
        )
        model = open_serving(bundle, key.public_key(), config.model, root / "m", root / "e")
        outbox = Outbox(root / "outbox.sqlite3", 1 << 28)
        scored = [0]  # counted, not kept: the benchmark holds no memory of its own per window

        def count(_: Verdict) -> None:
            scored[0] += 1

        runtime = EdgeRuntime(config, model, outbox, "bench", count)
        worker = runtime.worker
        assert worker is not None
        runtime.start_inference()
        sensors = len(model.schema.names)
        data_per_row = sensors * DATA_BYTES_PER_READING
        gc.collect()
        built = rss_bytes()

        def feed(first: int, rows: int) -> None:
            """`rows` rows per asset, one reading at a time, sensors interleaved."""
            ts = START + first + np.arange(rows, dtype=np.float64)
            data = [pump(rows, faulty=False, seed=first + r.index) for r in runtime.runners]
            for i in range(rows):
                for runner, x in zip(runtime.runners, data, strict=True):
                    for j in range(sensors):
                        runner.aligner.add_many(j, ts[i : i + 1], x[i : i + 1, j])
                    while (closed := runner.aligner.close_ready()) is not None:
                        runner.feed(closed, runtime.pipeline.emit, runtime.start_calibration)
                if i % 200 == 199:  # the inference thread keeps up
                    while worker.waiting:
                        time.sleep(0.01)

        def settle() -> None:
            while worker.waiting:
                time.sleep(0.05)
            gc.collect()

        half = args.history_rows // 2
        t0 = time.monotonic()
        feed(0, half)
        settle()
        at_half = rss_bytes()
        if args.tracemalloc:
            tracemalloc.start(4)
            before = tracemalloc.take_snapshot()
        feed(half, args.history_rows - half + 10)
        settle()
        full = rss_bytes()
        elapsed = time.monotonic() - t0
        history = runtime.runners[0].history
        arrays = history._v.nbytes + history._m.nbytes + history._slot.nbytes
        per_row_arrays = arrays / max(history.capacity, 1)
        rows_added = args.history_rows - half
        per_row_rss = (full - at_half) / (rows_added * ASSETS)
        print(
            f"{ASSETS} assets x {sensors} sensors, history {args.history_rows} rows each, "
            f"{scored[0]} windows scored in {elapsed:.0f}s"
        )
        print(f"RSS: runtime built {built / 2**20:.1f} MiB, history half full "
              f"{at_half / 2**20:.1f} MiB, full {full / 2**20:.1f} MiB")  # fmt: skip
        print(
            f"data per row {data_per_row} B; history arrays {per_row_arrays:.0f} B per row "
            f"({per_row_arrays / data_per_row:.2f}x data); RSS growth per row of history "
            f"{per_row_rss:.0f} B ({per_row_rss / data_per_row:.2f}x data); per asset at "
            f"full history {(full - built) / ASSETS / 2**10:.0f} KiB over the built runtime"
        )
        if args.tracemalloc:
            after = tracemalloc.take_snapshot()
            top = after.compare_to(before, "lineno")[:10]
            print("Python allocations grown while the second half was written:")
            for stat in top:
                print(f"  {stat.size_diff / 2**10:9.1f} KiB  {stat.traceback[0]}")
        runtime.stop_inference()
        outbox.close()
        model.close()


if __name__ == "__main__":
    main()
