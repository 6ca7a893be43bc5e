"""`autoglm device group create|list|revoke`: enrollment groups for factory images."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud.cli.numbers import UINT32_MAX, whole
from cloud.cli.output import (
    json_view,
    parse_duration,
    parse_labels,
    print_json,
    print_table,
    print_token_json,
)
from cloud.client import OperatorClient
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2


def add_parsers(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = dsub.add_parser(
        "group",
        help="enrollment groups: one token on a factory image enrolls up to N devices",
        description="A group's token enrolls up to --uses devices, each under the name it "
        "gives (`autoglm-edge enroll --bootstrap FILE --name NAME`, default its host name), "
        "with the group's labels ({name} in a value: the device's name) and profile.",
    )
    gsub = group.add_subparsers(dest="group_command", required=True, metavar="COMMAND")
    create = gsub.add_parser("create", help="a group and its token (shown once)")
    create.add_argument("name")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--profile", default="", help="device profile, e.g. jetson-orin-nx")
    create.add_argument(
        "--uses", type=whole(1, UINT32_MAX), required=True, help="devices it may enroll"
    )
    create.add_argument("--expires", default="30d", help="token lifetime (default 30d)")
    create.add_argument("--bootstrap-out", type=Path, help="the bootstrap file for the image")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=cmd_create, needs_client=True)
    listing = gsub.add_parser("list", help="groups with uses left and expiry")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    revoke = gsub.add_parser("revoke", help="its token enrolls no more devices")
    revoke.add_argument("name")
    revoke.set_defaults(handler=cmd_revoke, needs_client=True)


def cmd_create(args: argparse.Namespace, client: OperatorClient) -> int:
    from cloud.service.serde import bootstrap_from_group
    from edge_agent.bootstrap import write_bootstrap

    try:
        labels = parse_labels(args.label)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    try:
        ttl = int(parse_duration(args.expires))
    except ValueError as exc:
        raise InvalidInput(f"--expires: {exc}") from None
    if not 1 <= args.uses <= 2**32 - 1:
        raise InvalidInput(f"--uses {args.uses}: give the number of devices, at least 1")
    response = client.create_enrollment_group(
        operator_pb2.CreateEnrollmentGroupRequest(
            name=args.name, labels=labels, profile=args.profile, max_uses=args.uses,
            ttl_seconds=ttl,
        )
    )  # fmt: skip
    bootstrap = bootstrap_from_group(response)
    if args.bootstrap_out:
        write_bootstrap(args.bootstrap_out, bootstrap)
    if args.json:
        data = {"group": json_view(response.group)}
        print_token_json(args.bootstrap_out, data, response.enrollment_token)
        return 0
    g = response.group
    print(f"Enrollment group {g.name}: up to {g.max_uses} device(s) until "
          f"{bootstrap.expires_at.isoformat()}")  # fmt: skip
    if args.bootstrap_out:
        print(f"  bootstrap file: {args.bootstrap_out} (mode 0600; put it on the image)")
        print(f"  on each device: autoglm-edge enroll --bootstrap {args.bootstrap_out.name} "
              "--state-dir /var/lib/autoglm [--name NAME]")  # fmt: skip
    else:
        print(f"  enrollment token (shown once): {response.enrollment_token}")
    return 0


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    groups = client.list_enrollment_groups()
    if args.json:
        print_json([json_view(g) for g in groups])
        return 0
    print_table(
        ["NAME", "USES", "LABELS", "PROFILE", "EXPIRES", "STATE"],
        [
            [
                g.name,
                f"{g.uses}/{g.max_uses}",
                ",".join(f"{k}={v}" for k, v in sorted(g.labels.items())) or "-",
                g.profile or "-",
                g.expires_at.ToDatetime().strftime("%Y-%m-%d %H:%M"),
                "revoked" if g.HasField("revoked_at") else "in force",
            ]
            for g in groups
        ],
    )
    return 0


def cmd_revoke(args: argparse.Namespace, client: OperatorClient) -> int:
    g = client.revoke_enrollment_group(args.name)
    print(f"enrollment group {g.name} revoked ({g.uses} device(s) it enrolled stay)")
    return 0
