"""Small generated sensor histories: correlated pump-like signals with labelled faults."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

SENSORS = ("flow", "pressure", "current", "vibration")


def write_experiment(
    path: Path,
    seed: int,
    rows: int = 360,
    fault: tuple[int, int] | None = (200, 300),
    delimiter: str = ";",
    labels: bool = True,
) -> None:
    """One experiment: a shared load signal drives all sensors; a fault drops the flow and
    raises the vibration between the two rows given."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    load = np.sin(2 * np.pi * t / 40 + rng.uniform(0, 6)) + 0.1 * rng.standard_normal(rows)
    level = rng.normal(0, 0.3, size=4)
    x = np.stack(
        [
            10 + level[0] + load + 0.1 * rng.standard_normal(rows),
            3 + level[1] + 0.5 * load + 0.05 * rng.standard_normal(rows),
            1 + level[2] + 0.2 * load + 0.02 * rng.standard_normal(rows),
            0.2 + 0.05 * level[3] + 0.01 * rng.standard_normal(rows),
        ],
        axis=1,
    )
    anomaly = np.zeros(rows)
    if fault is not None:
        a, b = fault
        x[a:b, 0] -= 2.5
        x[a:b, 3] += 0.15
        anomaly[a:b] = 1
    start = dt.datetime(2024, 1, 1, 8, 0, 0) + dt.timedelta(hours=seed)
    header = ["datetime", *SENSORS] + (["anomaly"] if labels else [])
    lines = [delimiter.join(header)]
    for i in range(rows):
        stamp = (start + dt.timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S")
        cells = [stamp, *(f"{v:.5f}" for v in x[i])] + ([f"{anomaly[i]:.0f}"] if labels else [])
        lines.append(delimiter.join(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_dataset(root: Path, experiments: int = 6, normal: int = 2) -> Path:
    """`root/faults/*.csv` labelled experiments and `root/normal.csv` without labels."""
    for i in range(experiments):
        write_experiment(root / "faults" / f"{i}.csv", seed=i)
    write_experiment(root / "normal.csv", seed=100, rows=360 * normal, fault=None, labels=False)
    return root
