"""A synthetic plant of many sensors driven by a few shared factors, with broken correlations.

    python scripts/experiments/issue14/factor_plant.py --seed 1 --out /tmp/fp1 [--sensors 50]

Ten files of 2000 rows, 60 s apart, columns `timestamp`, x0..x{N-1}, `anomaly`. Per seed one
plant: loadings W ~ N(0, 1) [5, N]; per file its own factors F = cumsum(N(0, 1) * 0.05) [2000,
5]; X = F W + N(0, 0.3) + j (column offsets). Files 5-9 (f) get a ramp np.linspace(0, 4, 400)
added to sensors 3f..3f+3 (modulo N) at rows 1200-1600, labelled `anomaly` = 1 there: the
four sensors leave the pattern the factors impose on the rest.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

FILES = 10
ROWS = 2000
FACTORS = 5
PERIOD_S = 60
FAULT_ROWS = (1200, 1600)


def plant(seed: int, sensors: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values [ROWS, sensors], labels [ROWS]) per file."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(FACTORS, sensors))
    files = []
    for f in range(FILES):
        factors = np.cumsum(rng.normal(size=(ROWS, FACTORS)) * 0.05, axis=0)
        x = factors @ loadings + rng.normal(0.0, 0.3, size=(ROWS, sensors))
        x += np.arange(sensors, dtype=np.float64)
        labels = np.zeros(ROWS)
        if f >= FILES // 2:
            lo, hi = FAULT_ROWS
            faulty = [(f * 3 + i) % sensors for i in range(4)]
            x[lo:hi, faulty] += np.linspace(0.0, 4.0, hi - lo)[:, None]
            labels[lo:hi] = 1.0
        files.append((x, labels))
    return files


def write(out: Path, seed: int, sensors: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    header = ",".join(["timestamp", *(f"x{j}" for j in range(sensors)), "anomaly"])
    for f, (x, labels) in enumerate(plant(seed, sensors)):
        first = start + timedelta(days=f)
        lines = [header]
        for r in range(ROWS):
            stamp = (first + timedelta(seconds=PERIOD_S * r)).strftime("%Y-%m-%d %H:%M:%S")
            cells = ",".join(f"{v:.4f}" for v in x[r])
            lines.append(f"{stamp},{cells},{int(labels[r])}")
        (out / f"plant{f}.csv").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sensors", type=int, default=50)
    args = parser.parse_args()
    write(args.out, args.seed, args.sensors)


if __name__ == "__main__":
    main()
