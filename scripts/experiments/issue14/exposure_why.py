# EXP14k record: runs where TrainOptions.fault_exposure exists (commit ebc1a33; the labelling
# with IGNORE: the commit after it).
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

import cloud.model.pipeline as pl
from cloud.model.pipeline import TrainOptions
from cloud.model.protocol import train_without
from cloud.model.train import TrainParams

orig = pl.fit_thresholds


def spy(evidence, base):
    probs = np.concatenate(
        [e.values["supervised"][e.normal] for e in evidence if "supervised" in e.values]
    )
    print(
        "held-out normal windows",
        probs.size,
        "prob quantiles 50/90/95/99",
        np.quantile(probs, [0.5, 0.9, 0.95, 0.99]).round(3),
    )
    per = [
        (
            e.name if hasattr(e, "name") else "?",
            float(np.quantile(e.values["supervised"][e.normal], 0.95)),
        )
        for e in evidence
        if e.normal.any()
    ]
    per.sort(key=lambda x: -x[1])
    print("worst episodes q95", per[:8])
    # by position: the first, second, ... fifth of each held-out episode's scored windows
    fifths: list[list[float]] = [[] for _ in range(5)]
    for ep in evidence:
        prob = ep.values["supervised"]
        for i, part in enumerate(np.array_split(np.arange(prob.size), 5)):
            kept = part[ep.normal[part]]
            fifths[i].extend(prob[kept].tolist())
    print(
        "mean prob on normal windows by fifth of the episode",
        [round(float(np.mean(f)), 3) for f in fifths],
    )
    out = orig(evidence, base)
    print("decision supervised", out.decision.supervised, out.decision.prob_threshold)
    return out


pl.fit_thresholds = spy
key = ed25519.Ed25519PrivateKey.generate()
e = int(sys.argv[1])
kinds = tuple(k for k in sys.argv[2].split(",") if k) if len(sys.argv) > 2 else ()
opts = TrainOptions(
    name="x",
    version="1",
    fault_exposure=e,
    exposure_kinds=kinds,
    train=TrainParams(seed=19, threads=1),
)
train_without(
    [Path("/work/shared/datasets/skab")],
    Path("/work/shared/datasets/skab/valve1"),
    Path(f"/tmp/sel/why-{e}"),
    opts,
    key,
)
