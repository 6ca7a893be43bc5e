# EXP14k record: reads the bundle and key that heldback_far.py SEED K /tmp/h14 wrote.
import dataclasses
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import load_model
from cloud.model.data import read_table
from edge_agent.calibration import evidence_values, score_of
from edge_agent.scoring import calibrate
from edge_agent.windowing import align_to_grid

data = Path("/work/shared/datasets/skab")
out = Path("/tmp/h14")
seed = int(sys.argv[1])
key = ed25519.Ed25519PrivateKey.from_private_bytes((out / f"key-{seed}.pem").read_bytes())
with load_model(out / f"bundle-{seed}", key.public_key(), threads=1) as loaded:
    m = loaded.manifest
    d = loaded.frame.decision
    d0 = dataclasses.replace(d, supervised=False)
    sensors = [s.name for s in m.sensors]
    period = m.sampling.period_s
    print("prob_threshold", d.prob_threshold)
    for K in (200, 250, 300, 350):
        tot = np.zeros(3)
        per = []
        for f in sorted(
            list((data / "valve2").glob("*.csv")) + list((data / "other").glob("*.csv"))
        ):
            if f.name == "2.csv" and f.parent.name == "other":
                continue
            table = read_table(f, sensors, None, "anomaly")
            series = align_to_grid(
                np.arange(table.rows) * period, table.values, period, m.sampling.max_staleness_s
            )
            cal, _, ends, outs = calibrate(loaded.model, loaded.frame, series, K)
            o = outs.select(ends >= K)
            vals = evidence_values(o, cal, d)
            a = score_of(vals, d) >= 1
            b = score_of(vals, d0) >= 1
            tot += [a.sum(), b.sum(), a.size]
            per.append(f"{f.parent.name[0]}{f.stem}:{a.mean():.0%}/{b.mean():.0%}")
        print(
            f"K={K} FAR with head {tot[0] / tot[2]:.1%} without {tot[1] / tot[2]:.1%}  ",
            " ".join(per),
        )
