"""EXP14g diagnosis (selection only): which evidence carries injected kinds, and why not.

    PYTHONPATH=. .venv/bin/python scripts/experiments/issue14/diag14g.py BUNDLE [KIND,...]

BUNDLE from `scripts/evaluate_unseen.py --seeds 1,2 --seed 0 --keep BUNDLE` (its key beside
it as BUNDLE.pub). Per injected cell (injection seeds 1,2, both backgrounds): the counts, and
each kind of evidence over its threshold at the fault's last row, its 90 % quantile over the
fault rows and its 95 % quantile over the normal rows; per-sensor level deviations at the
fault's end.
"""

import json
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from cloud.model.backtest import load_model
from cloud.model.data import list_data_files, read_header
from cloud.model.faults import KINDS, inject
from cloud.model.protocol import normal_stretches
from edge_agent.calibration import (
    combine,
    evidence_values,
    level_deviation,
    smooth_causal,
    thresholds_of,
)
from edge_agent.scoring import calibrate
from edge_agent.windowing import align_to_grid

bundle = Path(sys.argv[1])
seeds = [1, 2]
kinds = (
    sys.argv[2].split(",")
    if len(sys.argv) > 2
    else ["temperature-ramp", "broken-correlation", "drift", "none"]
)
key = load_pem_public_key(bundle.with_suffix(".pub").read_bytes())
data = Path("/work/shared/datasets/skab")
unseen = data / "valve1"
with load_model(bundle, key, threads=1) as loaded:
    m = loaded.manifest
    d = m.decision
    sensors = tuple(s.name for s in m.sensors)
    print("sensors", sensors)
    print(
        "thresholds",
        {k: round(v, 3) for k, v in thresholds_of(loaded.frame.decision).items()},
        "alone",
        d.alone,
        "smoothing",
        d.smoothing,
    )
    for f in ("level_tolerance", "spread_tolerance", "subspace_tolerance"):
        print(f, getattr(d, f))
    print("training scale", [round(float(x), 4) for x in m.normalisation.scale])
    bgs = {
        "v1": normal_stretches(list_data_files(unseen), sensors, 400, 600),
        "unl": normal_stretches(
            [
                f
                for f in list_data_files(data)
                if unseen not in f.parents and "anomaly" not in read_header(f)[0]
            ],
            sensors,
            400,
            600,
        ),
    }
    for bg, stretches in bgs.items():
        print(
            f"\n==== background {bg}: {len(stretches)} stretches, scored rows "
            f"{[s.values.shape[0] - 400 for s in stretches][:3]}..."
        )
        for kind in kinds:
            rows = []
            for seed in seeds:
                for n, st in enumerate(stretches):
                    rng = np.random.default_rng([seed, n, [*KINDS, "none"].index(kind)])
                    fa = inject(st, kind, sensors, rng)
                    times = np.arange(fa.values.shape[0], dtype=np.float64)
                    series = align_to_grid(times, fa.values, 1.0, m.sampling.max_staleness_s)
                    cal, _, ends, out = calibrate(loaded.model, loaded.frame, series, 400)
                    vals = evidence_values(out, cal, loaded.frame.decision)
                    th = thresholds_of(loaded.frame.decision)
                    norm = {k: vals[k] / t for k, t in th.items() if k in vals}
                    raw = combine(list(norm.values()), d.combine, d.alone)
                    sm = smooth_causal(raw, d.smoothing)
                    sc = ends >= 400
                    lab = fa.labels[ends][sc]
                    flag = sm[sc] >= 1
                    lev = level_deviation(out.level, cal, d.level_tolerance)[sc]
                    seg = np.where(lab)[0]
                    info = dict(
                        kind=kind,
                        stretch=st.name,
                        seed=seed,
                        len=int(lab.sum()),
                        tp=int((flag & lab).sum()),
                        fp=int((flag & ~lab).sum()),
                        nneg=int((~lab).sum()),
                    )
                    if lab.any():
                        last = seg[-1]
                        info["end_norm"] = {
                            k: round(float(v[sc][last]), 2) for k, v in norm.items()
                        }
                        info["fault_q90"] = {
                            k: round(float(np.quantile(v[sc][lab], 0.9)), 2)
                            for k, v in norm.items()
                        }
                        info["end_levdev"] = [round(float(x), 2) for x in lev[last]]
                        info["site_scale"] = [float(f"{x:.3g}") for x in cal.input_scale]
                        info["level_scale"] = [round(float(x), 2) for x in cal.level_scale]
                    info["none_q95"] = {
                        k: round(float(np.quantile(v[sc][~lab], 0.95)), 2) for k, v in norm.items()
                    }
                    rows.append(info)
            tp = sum(r["tp"] for r in rows)
            fn = sum(r["len"] - r["tp"] for r in rows)
            fp = sum(r["fp"] for r in rows)
            print(
                f"\n-- {kind}: TP {tp} FN {fn} FP {fp}  "
                f"F1 {tp / (tp + (fn + fp) / 2) if tp + fn + fp else 0:.3f}  "
                f"MAR {fn / max(1, tp + fn):.3f}"
            )
            for r in rows:
                print(json.dumps(r))
