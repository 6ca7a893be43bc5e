"""`autoglm webhook add/list/rotate-secret/remove`: alert changes to Standard Webhooks
receivers, PagerDuty and Alertmanager."""

from __future__ import annotations

import argparse
import datetime as dt
import os

from cloud.cli.output import json_view, parse_duration, print_json, print_table
from cloud.client import OperatorClient
from cloud.webhook_kinds import KINDS, new_secret
from edge_agent.errors import InvalidInput

FILTER_HELP = (
    "which alert changes: key=value pairs joined by commas, keys state (firing|acknowledged|"
    "returned|resolved, several with |), device, asset, fault, min_score; default: all"
)
KIND_HELP = (
    "standard: Standard Webhooks (signed; verify with any standardwebhooks library); "
    "pagerduty: Events API v2 (URL defaults to PagerDuty's, --secret is the routing key); "
    "alertmanager: the URL of an Alertmanager (POST /api/v2/alerts)"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhook = sub.add_parser(
        "webhook", help="deliver alert changes: Standard Webhooks, PagerDuty, Alertmanager"
    )
    wsub = webhook.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")
    add = wsub.add_parser("add", help="deliver every matching alert change to a target")
    add.add_argument("url", nargs="?", default="", help="where to POST (pagerduty: optional)")
    add.add_argument("--kind", choices=KINDS, default="standard", help=KIND_HELP)
    add.add_argument(
        "--secret",
        default=os.environ.get("AUTOGLM_WEBHOOK_SECRET", ""),
        help="standard: a whsec_ secret (default: a new one, printed once); pagerduty: the "
        "routing key; alertmanager: an optional bearer token (or AUTOGLM_WEBHOOK_SECRET)",
    )
    add.add_argument("--filter", default="", help=FILTER_HELP)
    add.add_argument("--json", action="store_true")
    add.set_defaults(handler=cmd_add, needs_client=True)
    listing = wsub.add_parser("list", help="targets with delivered / pending / dead counts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    rotate = wsub.add_parser(
        "rotate-secret", help="sign with a new secret; the old one signs beside it for a while"
    )
    rotate.add_argument("id")
    rotate.add_argument("--secret", default="", help="the new whsec_ secret (default: a new one)")
    rotate.add_argument(
        "--overlap", default="24h", help="how long the old secret keeps signing (max 30d; 0: not)"
    )
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(handler=cmd_rotate, needs_client=True)
    remove = wsub.add_parser("remove", help="stop delivering (drops its queued deliveries)")
    remove.add_argument("id")
    remove.set_defaults(handler=cmd_remove, needs_client=True)


def cmd_add(args: argparse.Namespace, client: OperatorClient) -> int:
    if args.kind != "pagerduty" and not args.url:
        raise InvalidInput(f"webhook add --kind {args.kind} needs the URL to deliver to")
    secret, made = args.secret, False
    if args.kind == "standard" and not secret:
        secret, made = new_secret(), True
    hook = client.add_webhook(args.url, secret, args.filter, args.kind)
    if args.json:
        print_json({**json_view(hook), **({"secret": secret} if made else {})})
    else:
        print(f"{hook.kind} webhook {hook.id}: {hook.url} ({hook.filter or 'all alert changes'})")
        if made:
            print(f"secret (shown once; the receiver verifies with it): {secret}")
    return 0


def cmd_rotate(args: argparse.Namespace, client: OperatorClient) -> int:
    try:
        overlap = 0.0 if args.overlap.strip() in ("0", "0s") else parse_duration(args.overlap)
    except ValueError as exc:
        raise InvalidInput(f"--overlap: {exc}") from None
    secret, made = args.secret or new_secret(), not args.secret
    hook = client.rotate_webhook_secret(args.id, secret, int(overlap))
    if args.json:
        print_json({**json_view(hook), **({"secret": secret} if made else {})})
        return 0
    until = hook.previous_secret_until.ToDatetime(tzinfo=dt.UTC)
    if overlap == 0:
        print(f"webhook {hook.id}: the new secret signs now; the previous one no longer does")
    else:
        print(
            f"webhook {hook.id}: the new secret signs now, the previous one too until "
            f"{until:%Y-%m-%d %H:%M} UTC (give the receiver the new one before then)"
        )
    if made:
        print(f"new secret (shown once): {secret}")
    return 0


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    hooks = client.list_webhooks()
    if args.json:
        print_json([json_view(h) for h in hooks])
        return 0
    print_table(
        ["ID", "KIND", "URL", "FILTER", "DELIVERED", "PENDING", "DEAD", "LAST ERROR"],
        [
            [
                h.id[:8],
                h.kind or "standard",
                h.url,
                h.filter or "*",
                str(h.delivered),
                str(h.pending),
                str(h.dead),
                h.last_error[:50],
            ]
            for h in hooks
        ],
    )
    return 0


def cmd_remove(args: argparse.Namespace, client: OperatorClient) -> int:
    hook = client.remove_webhook(args.id)
    print(f"webhook {hook.id} removed ({hook.url})")
    return 0
