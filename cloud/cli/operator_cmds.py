"""`autoglm operator add/list/revoke` (roles: viewer, operator, admin) and `autoglm audit list`
(who did what, when, with which result)."""

from __future__ import annotations

import argparse
import datetime as dt

from cloud.cli.numbers import UINT32_MAX, whole
from cloud.cli.output import json_view, parse_duration, print_json, print_table
from cloud.client import OperatorClient
from cloud.clock import utc_now
from edge_agent.errors import InvalidInput

ROLE_HELP = (
    "viewer: reads; operator: also devices, models, rollouts, alerts; admin: also revoke and "
    "delete, webhooks, operators, the audit log"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    operator = sub.add_parser("operator", help="people and systems allowed to call the API")
    osub = operator.add_subparsers(dest="operator_command", required=True, metavar="COMMAND")
    add = osub.add_parser("add", help="a new operator and its token (shown once)")
    add.add_argument("name")
    add.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer",
                     help=ROLE_HELP)  # fmt: skip
    add.add_argument("--json", action="store_true")
    add.set_defaults(handler=cmd_add, needs_client=True)
    listing = osub.add_parser("list", help="operators with their roles")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    revoke = osub.add_parser("revoke", help="refuse this operator's token from now on")
    revoke.add_argument("name")
    revoke.set_defaults(handler=cmd_revoke, needs_client=True)

    audit = sub.add_parser("audit", help="the record of every mutating operator call")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    alist = asub.add_parser("list", help="newest first")
    alist.add_argument("--since", default="", help="e.g. 1h, 7d (default: all)")
    alist.add_argument("--operator", default="", help="only this operator's calls")
    alist.add_argument("--limit", type=whole(1, UINT32_MAX), default=100)
    alist.add_argument("--json", action="store_true")
    alist.set_defaults(handler=cmd_audit, needs_client=True)


def cmd_add(args: argparse.Namespace, client: OperatorClient) -> int:
    response = client.add_operator(args.name, args.role)
    if args.json:
        print_json(json_view(response))
        return 0
    print(f"operator {response.operator.name} ({response.operator.role}) added")
    print(f"  token (shown once): {response.token}")
    print(f"  use it: autoglm login --token ... --name {response.operator.name}")
    return 0


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    operators = client.list_operators()
    if args.json:
        print_json([json_view(o) for o in operators])
        return 0
    print_table(
        ["NAME", "ROLE", "CREATED", "REVOKED"],
        [
            [
                o.name,
                o.role,
                f"{o.created_at.ToDatetime(tzinfo=dt.UTC):%Y-%m-%d %H:%M}Z",
                f"{o.revoked_at.ToDatetime(tzinfo=dt.UTC):%Y-%m-%d %H:%M}Z"
                if o.HasField("revoked_at")
                else "-",
            ]
            for o in operators
        ],
    )
    return 0


def cmd_revoke(args: argparse.Namespace, client: OperatorClient) -> int:
    operator = client.revoke_operator(args.name)
    print(
        f"operator {operator.name} revoked; its token is refused within a few seconds (each "
        "replica caches good tokens for 5 s)"
    )
    return 0


def cmd_audit(args: argparse.Namespace, client: OperatorClient) -> int:
    since = None
    if args.since:
        try:
            since = utc_now() - dt.timedelta(seconds=parse_duration(args.since))
        except ValueError as exc:
            raise InvalidInput(f"--since: {exc}") from None
    entries = client.list_audit(since, args.operator, args.limit)
    if args.json:
        print_json([json_view(e) for e in entries])
        return 0
    if not entries:
        print("no audited calls" + (f" since {args.since}" if args.since else ""))
        return 0
    print_table(
        ["AT", "OPERATOR", "ROLE", "CALL", "RESULT", "TARGET"],
        [
            [
                f"{e.at.ToDatetime(tzinfo=dt.UTC):%Y-%m-%d %H:%M:%S}Z",
                e.operator,
                e.role,
                e.method,
                e.code if not e.detail else f"{e.code}: {e.detail[:60]}",
                e.target[:80],
            ]
            for e in entries
        ],
    )
    return 0
