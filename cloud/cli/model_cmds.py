"""`autoglm model train|evaluate|predict|quantize|export|build-engines|verify` (local work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cloud.cli import federated_cmds, health_cmds, job_cmds, rollout_cmds
from cloud.cli.numbers import (
    INT32_MAX,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_STEPS,
    MAX_THREADS,
    SEED_MAX,
    decimal,
    whole,
)
from cloud.cli.output import print_json, print_table
from cloud.client import OperatorClient
from edge_agent.decision_params import DecisionParams
from edge_agent.errors import InvalidInput

KEY_HELP = "Ed25519 signing key (PEM); default $AUTOGLM_SIGNING_KEY"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = sub.add_parser(
        "model", help="train, evaluate, quantize, export, verify, push and list bundles"
    )
    msub = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    rollout_cmds.add_model_parsers(msub)
    health_cmds.add_model_parsers(msub)
    federated_cmds.add_model_parsers(msub)

    train = msub.add_parser(
        "train",
        help="train on CSV/Parquet history, or fine-tune on captured windows; writes a signed "
        "bundle",
    )
    train.add_argument("--data", type=Path, action="append", metavar="DIR|FILE")
    train.add_argument(
        "--from-export",
        type=Path,
        metavar="DIR",
        help="fine-tune --base on an `autoglm data export` directory instead of --data",
    )
    train.add_argument(
        "--base",
        metavar="[NAME:]VERSION|BUNDLE_DIR",
        help="the model to fine-tune: a version pushed to the control plane (NAME defaults "
        "to --name), or a bundle directory",
    )
    train.add_argument(
        "--learning-rate",
        type=decimal(0, 10, above=True),
        help="fine-tuning only (default 2e-3)",
    )
    train.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    train.add_argument("--signing-key", type=Path, help=KEY_HELP)
    train.add_argument("--name", default="sensor-graph")
    train.add_argument("--model-version", default="", help="default: a UTC timestamp")
    train.add_argument("--label-column", default="anomaly")
    train.add_argument("--time-column", help="default: datetime/timestamp/time/date/ts")
    train.add_argument("--sensors", default="", help="comma-separated sensor columns, in order")
    train.add_argument("--units", default="", help="comma-separated units, same order")
    train.add_argument("--schema", type=Path, help="YAML with `sensors: [{name, unit}]`")
    train.add_argument("--ignore-column", action="append", default=[])
    train.add_argument(
        "--period",
        type=decimal(0, 86_400, above=True),
        help="sampling period in seconds (default: inferred)",
    )
    train.add_argument(
        "--window",
        type=whole(0, MAX_STEPS),
        default=0,
        help="steps per window (default: 120, or 64/32/16 where recordings are short)",
    )
    train.add_argument(
        "--segments",
        type=whole(1, MAX_STEPS),
        default=8,
        help="forecast segments per window (default 8)",
    )
    train.add_argument(
        "--stride", type=whole(1, MAX_STEPS), default=2, help="training window stride"
    )
    train.add_argument("--hidden", type=whole(1, 4096), default=32)
    train.add_argument("--calibration-rows", type=whole(1, INT32_MAX), default=400)
    train.add_argument("--epochs", type=whole(1, MAX_EPOCHS), default=12)
    train.add_argument("--batch-size", type=whole(1, MAX_BATCH), default=128)
    train.add_argument("--seed", type=whole(0, SEED_MAX), default=0)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _decision_flags(train)
    train.add_argument("--no-progress", action="store_true")
    job_cmds.add_executor_flags(train)
    train.set_defaults(handler=cmd_train, needs_client=_pulls_base)

    evaluate = msub.add_parser(
        "evaluate", help="SKAB protocol: calibrate on rows [0,K), score K on"
    )
    _bundle_args(evaluate)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument(
        "--calibration-rows", type=whole(1, INT32_MAX), required=True, metavar="K"
    )
    evaluate.add_argument("--label-column", default="anomaly")
    evaluate.add_argument("--variant", default="fp32")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = msub.add_parser("predict", help="datetime,score,anomaly per row from row K on")
    _bundle_args(predict)
    predict.add_argument("--data", type=Path, required=True)
    predict.add_argument("--calibration-rows", type=whole(1, INT32_MAX), required=True, metavar="K")
    predict.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    predict.add_argument("--variant", default="fp32")
    predict.set_defaults(handler=cmd_predict)

    quantize = msub.add_parser("quantize", help="add an INT8 or FP16 variant, gated on F1")
    quantize.add_argument("bundle", type=Path)
    quantize.add_argument("--precision", required=True, choices=["int8", "fp16"])
    quantize.add_argument("--calibration-data", type=Path, required=True)
    quantize.add_argument("--calibration-rows", type=whole(1, INT32_MAX), default=400)
    quantize.add_argument("--max-drop", type=decimal(0, 1), default=0.01)
    quantize.add_argument("--label-column", default="anomaly")
    quantize.add_argument("--signing-key", type=Path, help=KEY_HELP)
    quantize.set_defaults(handler=cmd_quantize)

    export = msub.add_parser("export", help="re-export ONNX from the checkpoint, parity-checked")
    export.add_argument("bundle", type=Path)
    export.add_argument("--signing-key", type=Path, help=KEY_HELP)
    export.add_argument("--tar", type=Path, help="also pack the bundle into this .tar")
    export.set_defaults(handler=cmd_export)

    engines = msub.add_parser("build-engines", help="TensorRT plans per device profile")
    engines.add_argument("bundle", type=Path)
    engines.add_argument(
        "--profile",
        action="append",
        required=True,
        help="device profile (repeat), or `all`: every profile in --profiles-dir",
    )
    engines.add_argument(
        "--profiles-dir", type=Path, help="default: the checkout's firmware_images/profiles"
    )
    engines.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    engines.add_argument("--signing-key", type=Path, help=KEY_HELP)
    job_cmds.add_executor_flags(engines)
    engines.set_defaults(handler=cmd_build_engines)

    verify = msub.add_parser("verify", help="check a bundle's signature, digests and golden test")
    _bundle_args(verify)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=cmd_verify)


def _bundle_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory or .tar")
    parser.add_argument("--public-key", type=Path, help="default $AUTOGLM_SIGNING_PUB")
    parser.add_argument("--signing-key", type=Path, help="verify with this key's public half")


def _decision_flags(parser: argparse.ArgumentParser) -> None:
    d = DecisionParams()
    parser.add_argument(
        "--target-far",
        type=decimal(0, 1, above=True),
        default=d.target_far,
        help="false-alarm budget: the share of normal windows the thresholds may flag on "
        f"held-out normal data (default {d.target_far})",
    )
    parser.add_argument(
        "--level-window",
        type=whole(0, MAX_STEPS),
        default=d.level_window,
        help=f"rows in a sensor's recent level; 0 turns level evidence off (default "
        f"{d.level_window})",
    )
    parser.add_argument(
        "--supervised",
        action=argparse.BooleanOptionalAction,
        default=d.supervised,
        help="let the fault head (trained where labels exist) take part in the decision "
        f"(default {'on' if d.supervised else 'off'})",
    )
    parser.add_argument(
        "--subspace",
        action=argparse.BooleanOptionalAction,
        default=d.subspace,
        help="evidence from the levels' residual off the site's principal directions "
        f"(default {'on' if d.subspace else 'off'})",
    )
    parser.add_argument("--smoothing", type=whole(1, MAX_STEPS), default=d.smoothing)
    parser.add_argument("--scale-floor", type=decimal(0, 1e6, above=True), default=d.scale_floor)
    parser.add_argument(
        "--threads",
        type=whole(0, MAX_THREADS),
        default=0,
        help="torch threads (default: free cores, at most 2)",
    )


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _pulls_base(args: argparse.Namespace) -> bool:
    """`--base VERSION` with `--from-export`: the base bundle comes from the control plane."""
    return args.from_export is not None and bool(args.base) and not Path(args.base).is_dir()


def cmd_train(args: argparse.Namespace, client: OperatorClient | None = None) -> int:
    if args.from_export is not None:
        return cmd_finetune(args, client)
    if not args.data:
        raise InvalidInput("give --data (history files) or --from-export (captured windows)")
    if args.base:
        raise InvalidInput("--base goes with --from-export (fine-tuning on captured windows)")
    from cloud.model.bundle_writer import load_signing_key
    from cloud.model.pipeline import TrainOptions, train_bundle
    from cloud.model.progress import ProgressBar
    from cloud.model.schema_file import read_schema_file
    from cloud.model.train import TrainParams

    if args.executor == "kubernetes":
        return job_cmds.run_as_job(args, "train", str(args.out))
    key = load_signing_key(args.signing_key)
    sensors, units = _split(args.sensors), _split(args.units)
    if args.schema is not None:
        if sensors:
            raise InvalidInput("give either --schema or --sensors, not both")
        sensors, units = read_schema_file(args.schema)
    if units and len(units) != len(sensors):
        raise InvalidInput(f"--units names {len(units)} units for {len(sensors)} sensors")
    for flag in ("segments", "stride", "hidden", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise InvalidInput(f"--{flag.replace('_', '-')} must be >= 1")
    if args.window < 0:
        raise InvalidInput("--window must be >= 1 (or 0: chosen from the data)")
    if args.window % args.segments:
        raise InvalidInput(f"--window {args.window} must be a multiple of --segments")
    options = TrainOptions(
        name=args.name,
        version=args.model_version,
        label_column=args.label_column,
        time_column=args.time_column,
        sensors=sensors,
        units=units,
        ignore_columns=tuple(args.ignore_column),
        period_s=args.period,
        window=args.window,
        segments=args.segments,
        stride=args.stride,
        hidden=args.hidden,
        calibration_rows=args.calibration_rows,
        train=TrainParams(
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
        ),
        decision=DecisionParams(
            smoothing=args.smoothing,
            scale_floor=args.scale_floor,
            level_window=args.level_window,
            supervised=args.supervised,
            target_far=args.target_far,
            subspace=args.subspace,
        ),
    )
    bar = None if args.no_progress else ProgressBar("training", sys.stderr)
    manifest = train_bundle(args.data, args.out, options, key, progress=bar)
    if bar is not None:
        bar.close()
    t = manifest.training
    print(
        f"wrote {args.out}: {manifest.name} {manifest.version}, {t['windows']} windows, "
        f"{t['wall_seconds']}s wall, {t['cpu_seconds']}s CPU on {t['torch_threads']} torch "
        f"threads, ONNX parity {manifest.export['parity_max_abs_diff']:.1e}"
    )
    return 0


def _verify_key(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cloud.model.bundle_writer import load_verify_key

    return load_verify_key(args.public_key, args.signing_key)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cloud.model.backtest import evaluate, load_model

    with load_model(args.bundle, _verify_key(args), args.variant) as loaded:
        results, total = evaluate(loaded, args.data, args.calibration_rows, args.label_column)
    if args.json:
        print_json(
            {
                "total": total.summary(),
                "files": [{"file": r.path, "rows": r.rows, **r.counts.summary()} for r in results],
            }
        )
        return 0
    rows = [
        [
            r.path,
            str(r.rows),
            f"{r.counts.f1:.3f}",
            f"{100 * r.counts.far:.1f}",
            f"{100 * r.counts.mar:.1f}",
        ]
        for r in results
    ]
    rows.append(
        [
            "TOTAL",
            str(sum(r.rows for r in results)),
            f"{total.f1:.3f}",
            f"{100 * total.far:.1f}",
            f"{100 * total.mar:.1f}",
        ]
    )
    print_table(["FILE", "ROWS", "F1", "FAR%", "MAR%"], rows)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cloud.model.backtest import load_model, predict

    with load_model(args.bundle, _verify_key(args), args.variant) as loaded:
        written = predict(loaded, args.data, args.calibration_rows, args.out)
    print(f"wrote {len(written)} files under {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from cloud.model.bundle_writer import load_signing_key
    from cloud.model.quantize import quantize_bundle

    result = quantize_bundle(
        args.bundle,
        args.precision,
        args.calibration_data,
        args.calibration_rows,
        args.max_drop,
        load_signing_key(args.signing_key),
        args.label_column,
    )
    counts = result.variant_counts
    print(
        f"added {args.precision}: F1 {result.f1_variant:.4f} (fp32 {result.f1_reference:.4f}, "
        f"against {result.reference}), FAR {100 * counts.far:.1f}%, MAR {100 * counts.mar:.1f}%"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cloud.model.bundle_writer import load_signing_key, pack
    from cloud.model.pipeline import reexport

    manifest = reexport(args.bundle, load_signing_key(args.signing_key))
    print(
        f"exported ONNX opset {manifest.opset}: parity {manifest.export['parity_max_abs_diff']:.1e}"
    )
    if args.tar is not None:
        print(f"packed {pack(args.bundle, args.tar)}")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from cloud.model.bundle_writer import load_signing_key
    from cloud.model.engines import build_engines

    profiles = engine_targets(args.profile, args.profiles_dir)
    if args.executor == "kubernetes":  # engines are built on the target device class's GPU
        if len(profiles) != 1:
            raise InvalidInput("--executor kubernetes builds one --profile per Job")
        args.node_selector = [*args.node_selector, f"autoglm.io/device-profile={profiles[0]}"]
        return job_cmds.run_as_job(args, "engines", str(args.bundle))
    manifest = build_engines(
        args.bundle, profiles, args.precision, load_signing_key(args.signing_key)
    )
    print(f"built engines for {', '.join(profiles)}; status {manifest.engines['status']}")
    return 0


def engine_targets(names: list[str], directory: Path | None) -> list[str]:
    """The profiles to build for: `all` expands to every known profile; a name that is not
    a known profile is an error when profiles are known."""
    from cloud.profiles import DEFAULT_DIR, load_profiles

    folder = directory or DEFAULT_DIR
    known = load_profiles(folder) if directory is not None or folder.is_dir() else {}
    if "all" in names:
        if not known:
            raise InvalidInput("--profile all needs device profiles (--profiles-dir)")
        return sorted(known)
    unknown = [n for n in names if known and n not in known]
    if unknown:
        raise InvalidInput(
            f"--profile {unknown[0]!r} is not a device profile in {folder} "
            f"(known: {', '.join(sorted(known))})"
        )
    return names


def cmd_verify(args: argparse.Namespace) -> int:
    from cloud.model.backtest import open_bundle_dir
    from edge_agent.selftest import run_self_test

    with open_bundle_dir(args.bundle, _verify_key(args)) as (directory, manifest):
        checks = run_self_test(directory, manifest)
    if args.json:
        print_json({"name": manifest.name, "version": manifest.version, "self_test": checks})
        return 0
    print(f"{manifest.name} {manifest.version}: signature and digests verify")
    for variant, diff in checks.items():
        print(f"  {variant}: golden difference {diff}")
    return 0


def cmd_finetune(args: argparse.Namespace, client: OperatorClient | None) -> int:
    """`model train --from-export DIR --base VERSION`: `cloud/model/finetune.py`."""
    import tempfile

    from cloud.model.bundle_writer import load_signing_key, trusted_keys
    from cloud.model.finetune import FinetuneOptions, finetune_bundle

    if args.data:
        raise InvalidInput("give either --data or --from-export, not both")
    if not args.base:
        raise InvalidInput("--from-export needs --base: the model version to fine-tune")
    if args.executor == "kubernetes":
        raise InvalidInput("--from-export runs here (the export is a local directory)")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise InvalidInput(f"--{flag.replace('_', '-')} must be >= 1")
    key = load_signing_key(args.signing_key)
    options = FinetuneOptions(
        version=args.model_version,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate or FinetuneOptions.learning_rate,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    with tempfile.TemporaryDirectory(prefix="autoglm-base-") as tmp:
        base = Path(args.base)
        if client is not None:
            name, _, version = args.base.rpartition(":")
            base = client.pull_bundle(name or args.name, version, Path(tmp) / "base")
        trusted = trusted_keys(args.signing_key, key)
        manifest = finetune_bundle(args.from_export, base, args.out, options, key, trusted=trusted)
    t = manifest.training
    print(
        f"wrote {args.out}: {manifest.name} {manifest.version}, fine-tuned from "
        f"{t['fine_tuned_from']} on {t['windows']} windows ({t['labelled_fault_windows']} "
        f"faults), {t['wall_seconds']}s wall on {t['torch_threads']} torch threads; "
        f"decision: {t['decision']['note']}"  # type: ignore[index]
    )
    return 0
