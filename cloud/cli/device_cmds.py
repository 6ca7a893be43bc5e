"""`autoglm device register|token|group|list|show|label|revoke|delete`."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from cloud.cli import alert_cmds, group_cmds
from cloud.cli.health_cmds import drift_line
from cloud.cli.output import (
    ago,
    json_view,
    parse_duration,
    parse_labels,
    print_json,
    print_table,
    print_token_json,
)
from cloud.client import OperatorClient
from cloud.clock import utc_now
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    device = sub.add_parser("device", help="register, list, label, revoke and delete edge devices")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    group_cmds.add_parsers(dsub)

    register = dsub.add_parser("register", help="create a device and its one-time enrollment token")
    register.add_argument("name")
    register.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    register.add_argument("--profile", default="", help="device profile, e.g. jetson-orin-nx-jp6")
    register.add_argument(
        "--token-ttl", default="", help="token lifetime, e.g. 30m, 24h (default: server's)"
    )
    register.add_argument(
        "--bootstrap-out", type=Path, help="write a bootstrap file for `autoglm-edge enroll`"
    )
    register.add_argument("--json", action="store_true")
    register.set_defaults(handler=cmd_register, needs_client=True)

    token = dsub.add_parser(
        "token",
        help="a new one-time enrollment token (the first expired, or the device must re-enroll)",
    )
    token.add_argument("device", help="id or name")
    token.add_argument("--token-ttl", default="", help="token lifetime, e.g. 30m, 24h")
    token.add_argument("--bootstrap-out", type=Path, help="write a bootstrap file")
    token.add_argument("--json", action="store_true")
    token.set_defaults(handler=cmd_token, needs_client=True)

    listing = dsub.add_parser(
        "list", help="devices with online state, labels, profile and versions"
    )
    listing.add_argument(
        "--selector",
        default="",
        metavar="SELECTOR",
        help="labels, Kubernetes style: k=v, k!=v, k in (a,b), k notin (a,b), k, !k",
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)

    show = dsub.add_parser("show", help="one device in full")
    show.add_argument("device", help="id or name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show, needs_client=True)

    label = dsub.add_parser("label", help="set or remove labels")
    label.add_argument("device")
    label.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    label.add_argument("--remove", action="append", default=[], metavar="KEY")
    label.set_defaults(handler=cmd_label, needs_client=True)

    revoke = dsub.add_parser(
        "revoke", help="revoke a device: its next call fails, its session ends"
    )
    revoke.add_argument("device")
    revoke.add_argument("--reason", default="")
    revoke.set_defaults(handler=cmd_revoke, needs_client=True)

    delete = dsub.add_parser(
        "delete",
        help="remove a revoked (or never enrolled) device and everything stored of it",
    )
    delete.add_argument("device")
    delete.set_defaults(handler=cmd_delete, needs_client=True)
    alert_cmds.add_device_parsers(dsub)


def _labels(items: list[str]) -> dict[str, str]:
    try:
        return parse_labels(items)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def _ttl(text: str) -> int:
    try:
        return int(parse_duration(text)) if text else 0
    except ValueError as exc:
        raise InvalidInput(f"--token-ttl: {exc}") from None


def cmd_register(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.register_device(
        operator_pb2.RegisterDeviceRequest(
            name=args.name,
            labels=_labels(args.label),
            profile=args.profile,
            token_ttl_seconds=_ttl(args.token_ttl),
        )
    )
    return _hand_out_token(args, response, f"Registered device {response.device.name}")


def cmd_token(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.issue_enrollment_token(args.device, _ttl(args.token_ttl))
    return _hand_out_token(args, response, f"New enrollment token for {response.device.name}")


def _hand_out_token(
    args: argparse.Namespace, response: operator_pb2.RegisterDeviceResponse, headline: str
) -> int:
    """Writes the bootstrap file or shows the token (once), as text or JSON."""
    from cloud.service.serde import bootstrap_from_registration
    from edge_agent.bootstrap import write_bootstrap

    bootstrap = bootstrap_from_registration(response)
    if args.bootstrap_out:
        write_bootstrap(args.bootstrap_out, bootstrap)
    if args.json:
        data = {
            "device": json_view(response.device),
            "expires_at": bootstrap.expires_at.isoformat(),
        }
        print_token_json(args.bootstrap_out, data, response.enrollment_token)
        return 0
    print(f"{headline} (id {response.device.id})")
    print(f"  enrollment token expires {bootstrap.expires_at.isoformat()}")
    if args.bootstrap_out:
        print(f"  bootstrap file: {args.bootstrap_out} (mode 0600; copy it to the device)")
        print(
            f"  on the device:  autoglm-edge enroll --bootstrap {args.bootstrap_out.name} "
            "--state-dir /var/lib/autoglm"
        )
    else:
        print(f"  enrollment token (shown once): {response.enrollment_token}")
        print("  tip: --bootstrap-out FILE writes everything the device needs into one file")
    return 0


def _rows(devices: list[operator_pb2.Device]) -> list[list[str]]:
    from cloud.domain import DeviceState
    from cloud.service.serde import device_from_proto

    now = utc_now()
    rows = []
    for msg in devices:
        d = device_from_proto(msg)
        state = (
            "revoked" if d.state is DeviceState.REVOKED else ("online" if msg.online else "offline")
        )
        if d.state is DeviceState.PENDING:
            state = "pending"
        rows.append(
            [
                d.name,
                state,
                ago(d.last_seen, now),
                ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())) or "-",
                d.profile or "-",
                d.agent_version or "-",
                msg.status.model_version or "-",
                msg.desired_model_version or "-",
                _expiry(msg, now),
            ]
        )
    return rows


def _expiry(msg: operator_pb2.Device, now: dt.datetime) -> str:
    """When the device's certificate expires ("-" before enrollment); agents renew it."""
    if not msg.HasField("cert_not_after"):
        return "-"
    left = msg.cert_not_after.ToDatetime(tzinfo=dt.UTC) - now
    if left.total_seconds() <= 0:
        return f"EXPIRED {ago(msg.cert_not_after.ToDatetime(tzinfo=dt.UTC), now)}"
    days = left.total_seconds() / 86_400
    return f"in {days:.0f}d" if days >= 1 else f"in {left.total_seconds() / 3600:.1f}h"


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    devices = client.list_devices(args.selector)
    if args.json:
        print_json([json_view(d) | {"online": d.online} for d in devices])
        return 0
    if not devices:
        print("no devices" + (f" match '{args.selector}'" if args.selector else " registered yet"))
        return 0
    print_table(
        [
            "NAME",
            "STATE",
            "LAST SEEN",
            "LABELS",
            "PROFILE",
            "AGENT",
            "MODEL",
            "DESIRED",
            "CERT EXPIRES",
        ],
        _rows(devices),
    )
    return 0


def cmd_show(args: argparse.Namespace, client: OperatorClient) -> int:
    msg = client.get_device(args.device)
    if args.json:
        print_json(json_view(msg) | {"online": msg.online})
        return 0
    row = _rows([msg])[0]
    print(f"name:        {msg.name}\nid:          {msg.id}\nstate:       {row[1]}")
    print(f"last seen:   {row[2]}\nlabels:      {row[3]}\nprofile:     {row[4]}")
    issuer = msg.status.certificate_issuer
    issued = f", issued by CA {issuer[:16]}" if issuer else ""
    print(f"agent:       {row[5]}\nmodel:       {row[6]}\ndesired:     {row[7]}")
    print(f"certificate: expires {row[8]}{issued}")
    if msg.status.inference_backend:
        print(f"backend:     {msg.status.inference_backend}")
    if msg.host.hostname:
        print(
            f"host:        {msg.host.hostname} ({msg.host.os} {msg.host.arch}, "
            f"{msg.host.cpu_count} CPUs)"
        )
    if msg.status.uptime_seconds:
        print(f"uptime:      {msg.status.uptime_seconds:.0f}s")
    root = msg.status.signing_root_version
    if msg.status.model_version or root:
        held = f"root version {root}" if root else "unknown (too old an agent to follow rotations)"
        print(f"signing:     {held}")
    for asset, drift in sorted(msg.status.health.drift.items()):
        print(f"drift:       {drift_line(asset, drift)}")
    if msg.status.health.outbox_unavailable:
        print(f"outbox:      unavailable: {msg.status.health.outbox_unavailable}")
    for gap in msg.status.health.lost_records:
        until = "ongoing" if gap.ongoing else f"to {_when(gap.last)}"
        cause = "killed: windows not scored" if gap.reason == "unclean_stop" else "disk full"
        print(f"lost:        {gap.records} record(s) ({cause}) from {_when(gap.first)} {until}")
    return 0


def _when(stamp: Any) -> str:
    moment: dt.datetime = stamp.ToDatetime(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_label(args: argparse.Namespace, client: OperatorClient) -> int:
    if not args.labels and not args.remove:
        raise InvalidInput("give labels to set (KEY=VALUE) or --remove KEY")
    msg = client.label_device(args.device, _labels(args.labels), args.remove)
    print(
        f"{msg.name}: "
        + (",".join(f"{k}={v}" for k, v in sorted(msg.labels.items())) or "(no labels)")
    )
    return 0


def cmd_delete(args: argparse.Namespace, client: OperatorClient) -> int:
    msg = client.delete_device(args.device)
    print(f"deleted {msg.name} ({msg.id}) with its predictions, alerts and rollout history")
    return 0


def cmd_revoke(args: argparse.Namespace, client: OperatorClient) -> int:
    msg = client.revoke_device(args.device, args.reason)
    print(f"revoked {msg.name} ({msg.id}); its certificate is refused from now on")
    return 0
