# EXP14k record: reads the bundle and key that heldback_far.py SEED K /tmp/h14 wrote.
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import load_model
from cloud.model.data import read_table
from edge_agent.scoring import calibrate
from edge_agent.windowing import align_to_grid

data = Path("/work/shared/datasets/skab")
out = Path("/tmp/h14")
seed = int(sys.argv[1])
K = int(sys.argv[2])
key = ed25519.Ed25519PrivateKey.from_private_bytes((out / f"key-{seed}.pem").read_bytes())
with load_model(out / f"bundle-{seed}", key.public_key(), threads=1) as loaded:
    m = loaded.manifest
    d = loaded.frame.decision
    sensors = [s.name for s in m.sensors]
    period = m.sampling.period_s
    for f in sorted(
        list((data / "valve2").glob("*.csv"))
        + list((data / "other").glob("*.csv"))
        + list((data / "valve1").glob("*.csv"))
    ):
        table = read_table(f, sensors, None, "anomaly")
        series = align_to_grid(
            np.arange(table.rows) * period, table.values, period, m.sampling.max_staleness_s
        )
        cal, _, ends, outs = calibrate(loaded.model, loaded.frame, series, K)
        p = outs.prob
        lab = table.labels[ends] > 0.5 if table.labels is not None else np.zeros(ends.size, bool)
        incal = ends < K
        after = (~incal) & (~lab)

        def q(part: np.ndarray, share: float) -> float:
            return float(np.quantile(part, share)) if part.size else -1.0

        name = f"{f.parent.name}/{f.name:7s}"
        cal_part = f"cal q50/q99/max {q(p[incal], 0.5):.2f}/{q(p[incal], 0.99):.2f}"
        cal_part += f"/{q(p[incal], 1.0):.2f}"
        after_part = f"after-normal q50/max {q(p[after], 0.5):.2f}/{q(p[after], 1.0):.2f}"
        print(name, cal_part, after_part, f"fault q50 {q(p[lab], 0.5):.2f}")
