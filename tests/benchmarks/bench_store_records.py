"""Synced records into the store: `Store.store_records` (batches of 500 predictions, 1 in 9
batches resent as duplicates) next to a raw `sqlite3` executemany of the same rows into a
table of the same shape, alternated over rounds in one run, per wall and CPU second.

    python tests/benchmarks/bench_store_records.py [--rounds 3] [--database-url URL]

With --database-url (PostgreSQL), the store runs there; the raw baseline stays SQLite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cloud.domain import PredictionRecord  # noqa: E402
from cloud.store import open_store  # noqa: E402

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
BATCHES, SIZE = 40, 500


def _records(device_id: str, start: int) -> list[PredictionRecord]:
    return [
        PredictionRecord(device_id, start + i, "pump-1", NOW, NOW, 0.5, False, "1",
                         {"flow": 0.1, "pressure": 0.2})
        for i in range(SIZE)
    ]  # fmt: skip


def store_round(url: str, tmp: Path, round_no: int) -> tuple[float, float, int]:
    store = open_store(url or f"sqlite:///{tmp / f'store-{round_no}.db'}")
    device = store.create_device(f"p{round_no}", {}, "", NOW)
    wall, cpu = time.perf_counter(), time.process_time()
    for b in range(BATCHES):
        store.store_records(device.id, _records(device.id, 1 + b * SIZE), [], NOW)
        if b % 8 == 7:  # a reconnect resends the last batch
            store.store_records(device.id, _records(device.id, 1 + b * SIZE), [], NOW)
    done = (time.perf_counter() - wall, time.process_time() - cpu)
    store.close()
    return done[0], done[1], (BATCHES + BATCHES // 8) * SIZE


def raw_round(tmp: Path, round_no: int) -> tuple[float, float, int]:
    db = sqlite3.connect(tmp / f"raw-{round_no}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE p (device_id TEXT, sequence INTEGER, asset TEXT, window_start TEXT, "
        "window_end TEXT, score REAL, anomalous INTEGER, model_version TEXT, contributions "
        "TEXT, received_at TEXT, PRIMARY KEY (device_id, sequence))"
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for b in range(BATCHES + BATCHES // 8):
        rows = [
            ("d", 1 + (b % BATCHES) * SIZE + i, "pump-1", NOW.isoformat(), NOW.isoformat(), 0.5,
             0, "1", json.dumps({"flow": 0.1, "pressure": 0.2}), NOW.isoformat())
            for i in range(SIZE)
        ]  # fmt: skip
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO p VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        db.execute("COMMIT")
    done = (time.perf_counter() - wall, time.process_time() - cpu)
    db.close()
    return done[0], done[1], (BATCHES + BATCHES // 8) * SIZE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    results: dict[str, list[tuple[float, float, int]]] = {"store": [], "raw sqlite3": []}
    for r in range(args.rounds):
        results["raw sqlite3"].append(raw_round(tmp, r))
        results["store"].append(store_round(args.database_url, tmp, r))
    summary = {}
    for name, runs in results.items():
        n = sum(k for _, _, k in runs)
        summary[name] = {
            "per_wall_s": round(n / sum(w for w, _, _ in runs)),
            "per_cpu_s": round(n / sum(c for _, c, _ in runs)),
        }
    raw, ours = summary["raw sqlite3"], summary["store"]
    for name, figures in summary.items():
        print(f"{name:12s} {figures['per_wall_s']:>9,} records/s  {figures['per_cpu_s']:>9,}/CPU-s")
    print(
        f"store / raw: {ours['per_wall_s'] / raw['per_wall_s']:.2f}x wall, "
        f"{ours['per_cpu_s'] / raw['per_cpu_s']:.2f}x per CPU-second"
    )
    print(json.dumps({"rounds": args.rounds, "database": args.database_url or "sqlite",
                      "results": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
