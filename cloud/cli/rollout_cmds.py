"""`autoglm model push/list/show` and `autoglm rollout ...`: ship models to devices in waves."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cloud.cli.numbers import UINT32_MAX, decimal, whole
from cloud.cli.output import json_view, parse_duration, print_json, print_table
from cloud.client import OperatorClient
from cloud.model.progress import ProgressBar
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

STATES = {v: k.removeprefix("STATE_").lower() for k, v in operator_pb2.Rollout.State.items()}


def add_model_parsers(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = msub.add_parser("push", help="upload a signed bundle (directory or .tar)")
    push.add_argument("bundle", type=Path)
    push.add_argument("--json", action="store_true")
    push.set_defaults(handler=cmd_push, needs_client=True)
    listing = msub.add_parser("list", help="models pushed to the control plane")
    listing.add_argument("--name", default="")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_models, needs_client=True)
    show = msub.add_parser("show", help="one pushed model: variants, metrics, sensors")
    show.add_argument("model", metavar="NAME:VERSION")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_model_show, needs_client=True)
    delete = msub.add_parser(
        "delete", help="remove a pushed version no device is assigned and no rollout uses"
    )
    delete.add_argument("model", metavar="NAME:VERSION")
    delete.set_defaults(handler=cmd_model_delete, needs_client=True)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="roll a model version out to devices in waves")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    create = rsub.add_parser("create", help="start a rollout")
    create.add_argument("model", metavar="NAME:VERSION")
    create.add_argument(
        "--selector",
        default="",
        help="device labels, Kubernetes style: k=v, k!=v, k in (a,b), k notin (a,b), k, !k "
        "(default: all)",
    )
    create.add_argument("--waves", default="1,10%,50%,100%", help="default 1,10%%,50%%,100%%")
    create.add_argument("--soak", default="10m", help="shadow soak per wave, e.g. 10m; 0: none")
    create.add_argument("--max-failures", default="5%", help="abort past this share of devices")
    create.add_argument(
        "--min-agreement", type=decimal(0, 1), default=0.9, help="shadow gate (0-1)"
    )
    create.add_argument(
        "--max-alert-rate-diff", type=decimal(0, 1), default=0.1, help="shadow gate (0-1)"
    )
    create.add_argument(
        "--max-latency-ratio", type=decimal(0, 1e6), default=2.0, help="p99 vs incumbent"
    )
    create.add_argument("--min-shadow-windows", type=whole(0, UINT32_MAX), default=20)
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=cmd_create, needs_client=True)
    status = rsub.add_parser(
        "status",
        help="one rollout, with progress per wave and device",
        description="Shows one rollout. Exit status: 0, or 1 when the rollout was aborted or "
        "ended partial (some devices failed) (so scripts can wait with --watch and branch on "
        "the outcome).",
    )
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="refresh until it ends")
    status.add_argument(
        "--interval", type=decimal(0.1, 3600), default=2.0, help="seconds (default 2)"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status, needs_client=True)
    listing = rsub.add_parser("list", help="rollouts, newest first")
    listing.add_argument("--active", action="store_true")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    for action in ("pause", "resume", "abort", "undo"):
        p = rsub.add_parser(
            action,
            help={
                "pause": "stop moving to the next step (devices keep what they have)",
                "resume": "carry on after a pause",
                "abort": "stop, and send updated devices back to their previous version",
                "undo": "send the devices a rollout updated back to their previous version, "
                "also after it succeeded (devices a later rollout took keep theirs)",
            }[action],
        )
        p.add_argument("id")
        p.add_argument("--reason", default="")
        p.set_defaults(handler=cmd_action, action=action, needs_client=True)


def _name_version(text: str) -> tuple[str, str]:
    name, sep, version = text.rpartition(":")
    if not sep or not name or not version:
        raise InvalidInput(f"model {text!r} must be NAME:VERSION, e.g. pump:2024.06")
    return name, version


def cmd_push(args: argparse.Namespace, client: OperatorClient) -> int:
    from edge_agent.bundle import unpack_tar  # numpy and friends: not for --help

    bar = ProgressBar("push", sys.stderr, unit="bytes")
    if args.bundle.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            model = client.push_bundle(unpack_tar(args.bundle, Path(tmp)), bar)
    elif args.bundle.is_dir():
        model = client.push_bundle(args.bundle, bar)
    else:
        raise InvalidInput(f"{args.bundle}: no such bundle directory or .tar")
    bar.close()
    if args.json:
        print_json(json_view(model))
    else:
        print(f"pushed {model.name}:{model.version} ({model.size_bytes} bytes)")
    return 0


def cmd_models(args: argparse.Namespace, client: OperatorClient) -> int:
    models = client.list_models(args.name)
    if args.json:
        print_json([json_view(m) for m in models])
        return 0
    rows = [
        [
            m.name,
            m.version,
            m.pushed_at.ToDatetime().strftime("%Y-%m-%d %H:%M"),
            ", ".join(v.name for v in m.variants),
            ", ".join(sorted({v.target_profile for v in m.variants if v.target_profile})) or "any",
            f"{m.size_bytes / 1e6:.1f} MB",
        ]
        for m in models
    ]
    print_table(["NAME", "VERSION", "PUSHED", "VARIANTS", "PROFILES", "SIZE"], rows)
    return 0


def cmd_model_delete(args: argparse.Namespace, client: OperatorClient) -> int:
    m = client.delete_model(*_name_version(args.model))
    print(f"deleted model {m.name}:{m.version}")
    return 0


def cmd_model_show(args: argparse.Namespace, client: OperatorClient) -> int:
    m = client.get_model(*_name_version(args.model))
    if args.json:
        print_json(json_view(m))
        return 0
    print(f"model:    {m.name}:{m.version}\nmanifest: {m.manifest_digest}")
    print(f"pushed:   {m.pushed_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC, {m.size_bytes} bytes")
    print("sensors:  " + ", ".join(s.name + (f" [{s.unit}]" if s.unit else "") for s in m.sensors))
    for key, value in sorted(m.metrics.items()):
        print(f"metric:   {key} = {value:.4g}")
    print_table(
        ["VARIANT", "FORMAT", "PRECISION", "PROFILE", "SIZE"],
        [
            [v.name, v.format, v.precision, v.target_profile or "any", str(v.size)]
            for v in m.variants
        ],
    )
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InvalidInput(f"--max-failures {text!r}: give a percentage like 5%") from None
    if not 0 <= value <= 1:
        raise InvalidInput(f"--max-failures {text!r} must be between 0% and 100%")
    return value


def cmd_create(args: argparse.Namespace, client: OperatorClient) -> int:
    name, version = _name_version(args.model)
    try:
        soak = 0.0 if args.soak.strip() == "0" else parse_duration(args.soak)
    except ValueError as exc:
        raise InvalidInput(f"--soak: {exc}") from None
    request = operator_pb2.CreateRolloutRequest(
        model_name=name,
        model_version=version,
        selector=args.selector,
        waves=[w for w in args.waves.split(",") if w.strip()],
        soak_seconds=round(soak),
        gates=operator_pb2.RolloutGates(
            # 0 means "default" on the wire, so an explicit 0% is sent as a tiny positive value
            max_failure_fraction=_fraction(args.max_failures) or 1e-9,
            min_shadow_agreement=args.min_agreement or 1e-9,
            max_alert_rate_difference=args.max_alert_rate_diff or 1e-9,
            max_latency_regression=args.max_latency_ratio,
            min_shadow_windows=args.min_shadow_windows,
        ),
    )
    rollout = client.create_rollout(request)
    if args.json:
        print_json(json_view(rollout))
    else:
        print(f"rollout {rollout.id} started: {name}:{version} to {len(rollout.devices)} device(s)")
        print(f"watch it: autoglm rollout status {rollout.id} --watch")
    return 0


def _print_status(r: operator_pb2.Rollout) -> None:
    print(
        f"rollout {r.id}: {r.model_name}:{r.model_version} -> "
        f"{r.selector or 'all devices'}   {STATES[r.state].upper()}"
        + (f" ({r.reason})" if r.reason else "")
    )
    if r.waiting_for:
        print(f"waiting for {r.waiting_for}")
    now = time.time()
    rows = []
    for w in r.waves:
        soak = ""
        if w.HasField("soak_until"):
            left = w.soak_until.ToSeconds() - now
            soak = f"soak {left:.0f}s left" if left > 0 else "soaked"
        marker = "*" if w.index == r.current_wave and STATES[r.state] == "running" else " "
        rows.append(
            [
                f"{marker}{w.index}",
                w.size,
                str(w.target_devices),
                str(w.updated),
                str(w.failed),
                "started" if w.HasField("started_at") else "waiting",
                soak,
            ]
        )
    print_table(["WAVE", "SIZE", "DEVICES", "UPDATED", "FAILED", "STATE", "SOAK"], rows)
    if r.devices:
        print()
        print_table(
            ["DEVICE", "WAVE", "STATE", "FROM", "AGREEMENT", "FLOOR", "WINDOWS", "DETAIL"],
            [
                [
                    d.device_name,
                    str(d.wave),
                    d.state,
                    d.previous_version or "-",
                    f"{d.shadow_agreement:.3f}" if d.shadow_windows else "-",
                    f"{d.shadow_self_agreement:.3f}" if d.shadow_self_agreement else "-",
                    str(d.shadow_windows),
                    d.detail[:60],
                ]
                for d in r.devices
            ],
        )


def cmd_status(args: argparse.Namespace, client: OperatorClient) -> int:
    while True:
        rollout = client.get_rollout(args.id)
        if args.json:
            print_json(json_view(rollout))
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\033[2J\033[H")
            _print_status(rollout)
        if not args.watch or STATES[rollout.state] in ("succeeded", "aborted", "partial"):
            return 1 if STATES[rollout.state] in ("aborted", "partial") else 0
        time.sleep(args.interval)


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    rollouts = client.list_rollouts(args.active)
    if args.json:
        print_json([json_view(r) for r in rollouts])
        return 0
    print_table(
        ["ID", "MODEL", "SELECTOR", "STATE", "WAVE", "CREATED"],
        [
            [
                r.id,
                f"{r.model_name}:{r.model_version}",
                r.selector or "*",
                STATES[r.state],
                f"{r.current_wave + 1}/{len(r.waves)}",
                r.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M"),
            ]
            for r in rollouts
        ],
    )
    return 0


def cmd_action(args: argparse.Namespace, client: OperatorClient) -> int:
    rollout = client.rollout_action(args.action, args.id, args.reason)
    print(f"rollout {rollout.id}: {STATES[rollout.state]}")
    return 0
