"""`autoglm webhook add/list/remove`: signed HTTP deliveries of alert changes."""

from __future__ import annotations

import argparse
import os

from cloud.cli.output import json_view, print_json, print_table
from cloud.client import OperatorClient
from edge_agent.errors import InvalidInput

FILTER_HELP = (
    "which alert changes: key=value pairs joined by commas, keys state (firing|acknowledged|"
    "resolved, several with |), device, asset, fault, min_score; default: all"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhook = sub.add_parser("webhook", help="deliver alert changes to an HTTP endpoint")
    wsub = webhook.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")
    add = wsub.add_parser("add", help="POST every matching alert change to URL, signed")
    add.add_argument("url")
    add.add_argument(
        "--secret",
        default=os.environ.get("AUTOGLM_WEBHOOK_SECRET", ""),
        help="HMAC-SHA256 key (>= 16 characters; or AUTOGLM_WEBHOOK_SECRET)",
    )
    add.add_argument("--filter", default="", help=FILTER_HELP)
    add.add_argument("--json", action="store_true")
    add.set_defaults(handler=cmd_add, needs_client=True)
    listing = wsub.add_parser("list", help="webhooks with delivered / pending / dead counts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    remove = wsub.add_parser("remove", help="stop delivering (drops its queued deliveries)")
    remove.add_argument("id")
    remove.set_defaults(handler=cmd_remove, needs_client=True)


def cmd_add(args: argparse.Namespace, client: OperatorClient) -> int:
    if not args.secret:
        raise InvalidInput("webhook add needs --secret (or AUTOGLM_WEBHOOK_SECRET)")
    hook = client.add_webhook(args.url, args.secret, args.filter)
    if args.json:
        print_json(json_view(hook))
    else:
        print(f"webhook {hook.id}: {hook.url} ({hook.filter or 'all alert changes'})")
    return 0


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    hooks = client.list_webhooks()
    if args.json:
        print_json([json_view(h) for h in hooks])
        return 0
    print_table(
        ["ID", "URL", "FILTER", "DELIVERED", "PENDING", "DEAD", "LAST ERROR"],
        [
            [
                h.id[:8],
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
