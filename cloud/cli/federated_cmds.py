"""`autoglm model train-local|federate`: federated fine-tuning (`cloud/model/federated.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, cast

from cloud.cli.numbers import MAX_BATCH, MAX_EPOCHS, MAX_THREADS, SEED_MAX, decimal, whole
from edge_agent.errors import InvalidInput

KEY_HELP = "Ed25519 signing key (PEM); default $AUTOGLM_SIGNING_KEY"


def add_model_parsers(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = msub.add_parser(
        "train-local",
        help="at a site: fine-tune a bundle on the site's export; write weight deltas only",
    )
    local.add_argument("--from-export", type=Path, required=True, metavar="DIR")
    local.add_argument("--base", type=Path, required=True, metavar="BUNDLE_DIR")
    local.add_argument("--out", type=Path, required=True, metavar="UPDATE_FILE")
    local.add_argument("--public-key", type=Path, help="default $AUTOGLM_SIGNING_PUB")
    local.add_argument("--signing-key", type=Path, help="verify with this key's public half")
    local.add_argument("--epochs", type=whole(1, MAX_EPOCHS), default=20)
    local.add_argument("--batch-size", type=whole(1, MAX_BATCH), default=64)
    local.add_argument("--learning-rate", type=decimal(0, 10, above=True), default=2e-3)
    local.add_argument("--seed", type=whole(0, SEED_MAX), default=0)
    local.add_argument("--device", default="auto", help="auto, cpu or cuda")
    local.add_argument(
        "--threads",
        type=whole(0, MAX_THREADS),
        default=0,
        help="torch threads (default: free cores)",
    )
    local.set_defaults(handler=cmd_train_local)

    federate = msub.add_parser(
        "federate", help="FedAvg the sites' train-local updates into a signed bundle"
    )
    federate.add_argument("--base", type=Path, required=True, metavar="BUNDLE_DIR")
    federate.add_argument(
        "--update", type=Path, action="append", required=True, metavar="UPDATE_FILE"
    )
    federate.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    federate.add_argument("--model-version", default="", help="default: a UTC timestamp")
    federate.add_argument("--signing-key", type=Path, help=KEY_HELP)
    federate.set_defaults(handler=cmd_federate)


def cmd_train_local(args: argparse.Namespace) -> int:
    from cloud.model.bundle_writer import load_verify_key
    from cloud.model.federated import train_local
    from cloud.model.finetune import FinetuneOptions

    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise InvalidInput(f"--{flag.replace('_', '-')} must be >= 1")
    options = FinetuneOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )
    trusted = load_verify_key(args.public_key, args.signing_key)
    update = train_local(args.from_export, args.base, args.out, options, trusted)
    print(
        f"wrote {args.out}: deltas of {len(update.delta)} parameters from "
        f"{update.base_name}:{update.base_version}, {update.training_windows} training windows "
        f"({update.fault_windows} faults); decision: {update.decision['note']}"
    )
    return 0


def cmd_federate(args: argparse.Namespace) -> int:
    from cloud.model.bundle_writer import load_signing_key, trusted_keys
    from cloud.model.federated import federate

    key = load_signing_key(args.signing_key)
    manifest = federate(
        args.base,
        args.update,
        args.out,
        args.model_version,
        key,
        trusted_keys(args.signing_key, key),
    )
    fed = cast(dict[str, Any], manifest.training["federated"])
    weights = ", ".join(f"{u['file']} {u['weight']:.2f}" for u in fed["updates"])
    print(
        f"wrote {args.out}: {manifest.name} {manifest.version}, one FedAvg round from "
        f"{manifest.training['fine_tuned_from']} over {len(fed['updates'])} updates "
        f"(weights {weights}), ONNX parity {manifest.export['parity_max_abs_diff']:.1e}"
    )
    return 0
