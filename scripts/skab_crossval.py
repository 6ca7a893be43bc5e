"""Honest valve1 figures: leave-files-out cross-validation through the real pipeline.

    python scripts/skab_crossval.py [--data ../shared/datasets/skab] [--folds 4]
        [--[no-]supervised] [--seed S] [--threads T] [--json]

Fold k trains a bundle (`train_bundle`, default options) on everything in the SKAB
development set except every 4th valve1 file from k, then evaluates those files with the
SKAB protocol (`--calibration-rows 400`). Prints per-fold and summed F1/FAR/MAR.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.backtest import evaluate, load_model
from cloud.model.metrics import Counts
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.train import TrainParams
from edge_agent.calibration import DecisionParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/skab"))
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument(
        "--supervised",
        action=argparse.BooleanOptionalAction,
        default=DecisionParams().supervised,
        help="let the fault head take part in the decision",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: up to 2)")
    parser.add_argument(
        "--json", action="store_true", help="print the counts as JSON (the text goes to stderr)"
    )
    args = parser.parse_args()
    key = ed25519.Ed25519PrivateKey.generate()
    valve1 = sorted((args.data / "valve1").glob("*.csv"), key=lambda p: int(p.stem))
    held_back_starts = sorted(p for d in ("valve2", "other") for p in (args.data / d).glob("*.csv"))
    others = [args.data / "anomaly-free.csv", *held_back_starts]
    text = sys.stderr if args.json else sys.stdout  # --json: stdout holds only the JSON
    total = Counts()
    folds: list[dict[str, float | int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fold in range(args.folds):
            held = valve1[fold :: args.folds]
            train_dir, test_dir = Path(tmp) / f"train{fold}", Path(tmp) / f"test{fold}"
            train_dir.mkdir()
            test_dir.mkdir()
            for path in others + [p for p in valve1 if p not in held]:
                (train_dir / f"{path.parent.name}-{path.name}").symlink_to(path.resolve())
            for path in held:
                (test_dir / path.name).symlink_to(path.resolve())
            bundle = Path(tmp) / f"bundle{fold}"
            options = TrainOptions(
                train=TrainParams(seed=args.seed, threads=args.threads),
                decision=DecisionParams(supervised=args.supervised),
            )
            train_bundle([train_dir], bundle, options, key, log=lambda _: None)
            with load_model(bundle, key.public_key(), threads=args.threads) as loaded:
                _, counts = evaluate(loaded, test_dir, 400)
            total = total + counts
            folds.append(counts.summary())
            names = ",".join(p.stem for p in held)
            print(
                f"fold {fold} (valve1 {names}): F1 {counts.f1:.3f} FAR {100 * counts.far:.1f}% "
                f"MAR {100 * counts.mar:.1f}%",
                flush=True,
                file=text,
            )
    print(
        f"TOTAL: F1 {total.f1:.3f} FAR {100 * total.far:.1f}% MAR {100 * total.mar:.1f}%",
        file=text,
    )
    if args.json:
        print(json.dumps({"folds": folds, "total": total.summary(), "seed": args.seed}))


if __name__ == "__main__":
    main()
