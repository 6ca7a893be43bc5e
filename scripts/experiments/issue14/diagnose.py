"""Where valve1's missed fault rows are (issue 14).

    python scripts/experiments/issue14/diagnose.py BUNDLE [BUNDLE...]   (key: BUNDLE.pub)

Per labelled fault segment: rows missed before the first flag (onset), between the first and
the last flag (dips), after the last flag (tail); and, over the missed rows, the smoothed
score and which kind of evidence is strongest (over its threshold)."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from cloud.model.backtest import LoadedModel
from cloud.model.data import list_data_files, read_table
from edge_agent.bundle import Manifest
from edge_agent.calibration import evidence_values, score_of, smooth_causal, thresholds_of
from edge_agent.inference.base import open_backend
from edge_agent.scoring import calibrate, frame_of
from edge_agent.windowing import align_to_grid

K = 400
OFFSETS = (-20, -5, 0, 5, 10, 20, 30, 40, 50, 60, 80, 100)
KINDS = ("level", "joint", "spread", "forecast", "supervised")
DATA = Path("/work/shared/datasets/skab/valve1")


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


for bundle in map(Path, sys.argv[1:]):
    # The selection bundles were written while the C1 field existed (off): read them
    # without it (unsigned reading; these are our own bundles from this experiment).
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["decision"].pop("fast_return", None)
    manifest = Manifest.model_validate(doc)
    backend = open_backend("onnxruntime", bundle, manifest, "fp32", threads=1)
    loaded = LoadedModel(bundle, manifest, backend, frame_of(manifest))
    if True:
        m, frame = loaded.manifest, loaded.frame
        d = frame.decision
        sensors = [s.name for s in m.sensors]
        tot = Counter()
        kinds_missed: Counter = Counter()
        score_missed: list[float] = []
        profile: dict[str, dict[str, dict[int, list[float]]]] = {
            e: {k: {o: [] for o in OFFSETS} for k in [*KINDS, "smoothed"]} for e in ("start", "end")
        }
        phase: dict[str, list[tuple[int, float, float, float]]] = {
            "onset": [],
            "dips": [],
            "tail": [],
        }
        print(f"\n## {bundle}")
        print("file seg_len latency onset dips tail detected_rows")
        for path in list_data_files(DATA):
            table = read_table(path, sensors, None, "anomaly")
            series = align_to_grid(
                table.times, table.values, m.sampling.period_s, m.sampling.max_staleness_s
            )
            first = int(series.row_slot[K])
            cal, _, ends, out = calibrate(loaded.model, frame, series, first)
            values = evidence_values(out, cal, d)
            raw = score_of(values, d)
            smooth = smooth_causal(raw, d.smoothing)
            norm = {k: values[k] / t for k, t in thresholds_of(d).items() if k in values}
            pos = {int(e): i for i, e in enumerate(ends)}
            idx = np.asarray([pos[int(s)] for s in series.row_slot[K:]])
            flags = smooth[idx] >= 1.0
            labels = table.labels[K:] > 0.5
            for a, b in runs(labels):
                for anchor, label in ((a, "start"), (b, "end")):
                    for off in OFFSETS:
                        r = anchor + off
                        if 0 <= r < len(idx):
                            w = idx[r]
                            for k, v in norm.items():
                                profile[label][k][off].append(float(v[w]))
                            profile[label]["smoothed"][off].append(float(smooth[w]))
                f = flags[a:b]
                hit = np.flatnonzero(f)
                n = b - a
                if hit.size == 0:
                    onset, dips, tail, lat = n, 0, 0, n
                else:
                    lat = int(hit[0])
                    onset = lat
                    tail = n - 1 - int(hit[-1])
                    dips = int((~f[hit[0] : hit[-1] + 1]).sum())
                tot.update(onset=onset, dips=dips, tail=tail, fault=n, det=int(f.sum()))
                print(f"{path.name} {n} {lat} {onset} {dips} {tail} {int(f.sum())}")
                first_hit = a + (int(hit[0]) if hit.size else n)
                last_hit = a + (int(hit[-1]) if hit.size else -1)
                for r in np.flatnonzero(~f) + a:
                    w = idx[r]
                    part = "onset" if r < first_hit else ("tail" if r > last_hit else "dips")
                    over = sum(float(v[w]) >= 1.0 for v in norm.values())
                    top = max(float(v[w]) for v in norm.values())
                    phase[part].append((over, top, float(raw[w]), float(smooth[w])))
                    score_missed.append(float(smooth[w]))
                    kinds_missed[max(norm, key=lambda k: norm[k][w])] += 1
        missed = tot["onset"] + tot["dips"] + tot["tail"]
        print(
            f"fault rows {tot['fault']}, missed {missed} ({missed / tot['fault']:.1%}): "
            f"onset {tot['onset']}, dips {tot['dips']}, tail {tot['tail']}"
        )
        s = np.asarray(score_missed)
        print(
            "smoothed score on missed rows: quantiles 10/25/50/75/90 %:",
            np.round(np.quantile(s, [0.1, 0.25, 0.5, 0.75, 0.9]), 2),
            f"share >= 0.8: {(s >= 0.8).mean():.1%}, >= 0.6: {(s >= 0.6).mean():.1%}",
        )
        print("strongest kind on missed rows:", dict(kinds_missed))
        for part, rows in phase.items():
            arr = np.asarray(rows)
            print(
                f"{part}: {len(rows)} rows; kinds over threshold 0/1/2+: "
                f"{(arr[:, 0] == 0).mean():.0%}/{(arr[:, 0] == 1).mean():.0%}/"
                f"{(arr[:, 0] >= 2).mean():.0%}; strongest kind >= 1.15 (alone): "
                f"{(arr[:, 1] >= 1.15).mean():.0%}; raw >= 1: {(arr[:, 2] >= 1).mean():.0%}; "
                f"smoothed median {np.median(arr[:, 3]):.2f}"
            )
        for e, kinds in profile.items():
            print(f"mean evidence / threshold by rows from the fault's {e}:")
            print("kind       " + " ".join(f"{o:>5}" for o in OFFSETS))
            for k, by in kinds.items():
                cells = " ".join(f"{np.mean(v) if v else np.nan:5.2f}" for v in by.values())
                print(f"{k:10} {cells}")
