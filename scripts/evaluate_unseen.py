"""The unseen-fault protocol: how the detector does on fault kinds it has no labels for.

    python scripts/evaluate_unseen.py [--data ../shared/datasets/skab] [--unseen valve1]
        [--seeds 100,101,102] [--json] [--[no-]labelled-far] [--prefix-calibration 250,300,350]
        [train flags: --epochs, --segments, --level-window, --target-far, --smoothing,
        --combine, --alone, --[no-]subspace, --[no-]supervised, --seed, --threads]

1. *Unseen kind*: trains a bundle (`train_bundle`, default options unless given) with the
   files under `--unseen` reduced to their first `--calibration-rows` rows and no labels, then
   scores those files completely under the SKAB protocol.
2. *Injected faults* (`cloud/model/faults.py`), with that bundle: every kind written into
   real normal stretches at random onsets and durations, per seed, F1/FAR/MAR per kind.
   Backgrounds: the `--unseen` files' rows before their labelled fault (calibrated on the
   first K rows; the rows after K were never seen in training), and pieces of the unlabelled
   files (calibrated on K, the background seen in training as normal context).
3. *Other sites under labels* (`--labelled-far`, on by default): a second bundle trained as
   `autoglm model train` trains, with every label (the `--unseen` kind's too), then false alarms
   on the normal rows of the labelled files outside `--unseen` (rows before their first fault,
   calibrated on each of `--prefix-calibration` rows) and of the unlabelled files (calibrated
   on `--calibration-rows`). What a head trained on one kind's labels does at other sites.
Model choices are made on `--seeds` other than the reporting seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloud.model.backtest import load_model
from cloud.model.data import list_data_files, read_header
from cloud.model.metrics import Counts
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.protocol import (
    normal_stretches,
    other_sites_far,
    prefix_stretches,
    score_injected,
    site_name,
    train_without,
    unseen_kind,
)
from cloud.model.train import TrainParams
from edge_agent.calibration import DecisionParams


def _row(name: str, counts: Counts, extra: str = "") -> str:
    return f"| {name} | {counts.f1:.3f} | {counts.far:.1%} | {counts.mar:.1%} |{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/skab"))
    parser.add_argument("--unseen", default="valve1", help="folder under --data")
    parser.add_argument("--calibration-rows", type=int, default=400)
    parser.add_argument("--seeds", default="100,101,102")
    parser.add_argument("--scored-rows", type=int, default=600, help="per injected stretch")
    parser.add_argument("--epochs", type=int, default=TrainParams().epochs)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--level-window", type=int, default=DecisionParams().level_window)
    parser.add_argument("--target-far", type=float, default=DecisionParams().target_far)
    parser.add_argument("--smoothing", type=int, default=DecisionParams().smoothing)
    parser.add_argument(
        "--supervised",
        action=argparse.BooleanOptionalAction,
        default=DecisionParams().supervised,
        help="let the fault head take part in the decision",
    )
    parser.add_argument(
        "--labelled-far",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train with every label and count false alarms at the other sites",
    )
    parser.add_argument(
        "--prefix-calibration",
        type=row_counts,
        default=row_counts("250,300,350"),
        help="calibration lengths for the other sites' rows before their fault (section 3)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: up to 2)")
    parser.add_argument("--device", default=TrainParams().device, help="auto, cpu or cuda")
    parser.add_argument("--combine", default=DecisionParams().combine)
    parser.add_argument("--alone", type=float, default=DecisionParams().alone)
    parser.add_argument(
        "--subspace", action=argparse.BooleanOptionalAction, default=DecisionParams().subspace
    )
    parser.add_argument("--segments", type=int, default=TrainOptions().segments)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="copy the trained bundle here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unseen = args.data / args.unseen
    options = TrainOptions(
        name="unseen-protocol",
        version="1",
        calibration_rows=args.calibration_rows,
        segments=args.segments,
        train=TrainParams(
            epochs=args.epochs, seed=args.seed, threads=args.threads, device=args.device
        ),
        decision=DecisionParams(
            level_window=args.level_window,
            target_far=args.target_far,
            smoothing=args.smoothing,
            supervised=args.supervised,
            combine=args.combine,
            alone=args.alone,
            subspace=args.subspace,
        ),
    )
    key = ed25519.Ed25519PrivateKey.generate()
    report: dict[str, object] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    with tempfile.TemporaryDirectory(prefix="autoglm-unseen-") as tmp:
        bundle = Path(tmp) / "bundle"
        started, cpu = time.monotonic(), time.process_time()
        train_without([args.data], unseen, bundle, options, key)
        report["train_wall_s"] = round(time.monotonic() - started, 1)
        report["train_cpu_s"] = round(time.process_time() - cpu, 1)
        report["train_device"] = args.device
        if args.keep is not None:
            shutil.copytree(bundle, args.keep)
            args.keep.with_suffix(".pub").write_bytes(
                key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            )
        files, total = unseen_kind(bundle, unseen, key.public_key(), args.calibration_rows)
        report["unseen_kind"] = {"kind": args.unseen, "total": total.summary()}
        with load_model(bundle, key.public_key(), threads=args.threads) as loaded:
            sensors = [s.name for s in loaded.manifest.sensors]
            backgrounds = {
                f"{args.unseen} before its fault (unseen rows)": normal_stretches(
                    list_data_files(unseen), sensors, args.calibration_rows, args.scored_rows
                ),
                "unlabelled files (seen as context)": normal_stretches(
                    [
                        f
                        for f in list_data_files(args.data)
                        if unseen not in f.parents and "anomaly" not in read_header(f)[0]
                    ],
                    sensors,
                    args.calibration_rows,
                    args.scored_rows,
                ),
            }
            injected = {}
            for name, stretches in backgrounds.items():
                results = score_injected(loaded, stretches, seeds)
                overall = sum((r.counts for r in results if r.kind != "none"), Counts())
                injected[name] = {
                    "stretches": len(stretches),
                    "kinds": {r.kind: r.counts.summary() for r in results},
                    "overall": overall.summary(),
                }
            report["injected"] = injected
            report["decision"] = loaded.manifest.decision.model_dump()
            report["training"] = {
                k: loaded.manifest.training.get(k)
                for k in ("device", "seconds", "wall_seconds", "cpu_seconds", "torch_threads")
            }
        if args.labelled_far:
            report["labelled_training"] = labelled_far(args, options, key, Path(tmp))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return
    print(
        f"training without {args.unseen} labels: {report['train_wall_s']}s wall, "
        f"{report['train_cpu_s']}s CPU"
    )
    print(f"\n## Unseen kind: {args.unseen} (SKAB protocol, K={args.calibration_rows})\n")
    print("| file | F1 | FAR | MAR |\n|---|---:|---:|---:|")
    for path, counts in files:
        print(_row(path, counts))
    print(_row("**total**", total))
    for name, block in injected.items():
        print(f"\n## Injected faults, seeds {args.seeds}: {name}, {block['stretches']} stretches\n")
        print("| kind | F1 | FAR | MAR |\n|---|---:|---:|---:|")
        for kind, s in block["kinds"].items():  # type: ignore[union-attr]
            print(f"| {kind} | {s['f1']:.3f} | {s['far']:.1%} | {s['mar']:.1%} |")
        o = block["overall"]
        print(f"| **overall** | {o['f1']:.3f} | {o['far']:.1%} | {o['mar']:.1%} |")  # type: ignore[index]
    labelled = report.get("labelled_training")
    if isinstance(labelled, dict):
        print("\n## Trained with every label: false alarms at the other sites\n")
        print("| normal rows | rows | FAR |\n|---|---:|---:|")
        for name, block in labelled["far"].items():
            far = f"{block['far']:.1%}" if block["rows"] else "n/a (no rows)"
            print(f"| {name} | {block['rows']} | {far} |")
        skipped = labelled["files_without_a_stretch"]
        if skipped:
            print(f"\nlabelled files with too few rows before their fault: {', '.join(skipped)}")
    print(f"\ndecision: {report['decision']}")


def row_counts(text: str) -> list[int]:
    """`--prefix-calibration`: comma-separated positive row counts."""
    try:
        counts = [int(k) for k in text.split(",") if k.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not comma-separated whole numbers") from exc
    if not counts or any(k < 2 for k in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: each calibration length must be >= 2 rows")
    return counts


def labelled_far(
    args: argparse.Namespace, options: TrainOptions, key: ed25519.Ed25519PrivateKey, tmp: Path
) -> dict[str, object]:
    """Section 3 of the module doc: the bundle `model train` would make, at the other sites."""
    bundle = tmp / "labelled"
    started, cpu = time.monotonic(), time.process_time()
    train_bundle([args.data], bundle, options, key, log=lambda _: None)
    out: dict[str, object] = {
        "train_wall_s": round(time.monotonic() - started, 1),
        "train_cpu_s": round(time.process_time() - cpu, 1),
    }
    unseen = args.data / args.unseen
    others = [f for f in list_data_files(args.data) if unseen not in f.parents]
    with load_model(bundle, key.public_key(), threads=args.threads) as loaded:
        sensors = [s.name for s in loaded.manifest.sensors]
        labelled = [f for f in others if "anomaly" in read_header(f)[0]]
        groups = {
            "other kinds' sites before their fault": prefix_stretches(
                labelled, sensors, args.prefix_calibration
            ),
            "unlabelled files": normal_stretches(
                [f for f in others if f not in labelled],
                sensors,
                args.calibration_rows,
                args.scored_rows,
            ),
        }
        far: dict[str, object] = {}
        for name, stretches in groups.items():
            per = other_sites_far(loaded, stretches)
            total = sum((c for _, c in per), Counts())
            far[name] = total.summary() | {
                "rows": total.fp + total.tn,
                "stretches": {n: round(c.far, 4) for n, c in per},
            }
        prefixes = groups["other kinds' sites before their fault"]
        out["files_without_a_stretch"] = sorted(
            site
            for site in map(site_name, labelled)
            if not any(s.name.startswith(f"{site}[") for s in prefixes)
        )
        out["far"] = far
        out["supervised"] = loaded.manifest.decision.supervised
    return out


if __name__ == "__main__":
    main()
