"""`autoglm maintenance add/list/remove`: maintenance windows and out-of-service assets."""

from __future__ import annotations

import argparse
import datetime as dt

from cloud.cli.output import (
    DurationTooLong,
    json_view,
    parse_duration,
    print_json,
    print_table,
)
from cloud.client import OperatorClient
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

TIME_HELP = "an ISO time (2026-12-01T06:00, UTC unless it says) or from now: 30m, 8h, 2d"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "maintenance", help="maintenance windows: alerts stored but neither delivered nor shown"
    )
    msub = m.add_subparsers(dest="maintenance_command", required=True, metavar="COMMAND")
    add = msub.add_parser(
        "add", help="hold back the alerts of matching devices (and asset) for a while"
    )
    add.add_argument("--selector", required=True, help="device labels, e.g. site=a,line=2")
    add.add_argument("--asset", default="", help="only this asset (default: every asset)")
    add.add_argument("--from", dest="start", default="", help=f"start; default now; {TIME_HELP}")
    add.add_argument(
        "--to", dest="end", default="", help=f"end; {TIME_HELP}; leave out: out of service"
    )
    add.add_argument("--reason", required=True)
    add.add_argument("--json", action="store_true")
    add.set_defaults(handler=cmd_add, needs_client=True)
    listing = msub.add_parser("list", help="windows active now or later")
    listing.add_argument("--all", action="store_true", help="ended windows too")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    remove = msub.add_parser("remove", help="end a window now (held-back alerts are delivered)")
    remove.add_argument("id")
    remove.set_defaults(handler=cmd_remove, needs_client=True)


def parse_time(text: str, flag: str, now: dt.datetime) -> dt.datetime | None:
    if not text:
        return None
    try:
        return now + dt.timedelta(seconds=parse_duration(text))
    except DurationTooLong as exc:  # a duration, only too long: not an ISO time either
        raise InvalidInput(f"{flag}: {exc}") from None
    except ValueError:
        pass
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{flag} {text!r}: {TIME_HELP}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def cmd_add(args: argparse.Namespace, client: OperatorClient) -> int:
    now = dt.datetime.now(dt.UTC)
    window = client.add_maintenance(
        args.selector,
        args.reason,
        args.asset,
        parse_time(args.start, "--from", now),
        parse_time(args.end, "--to", now),
    )
    if args.json:
        print_json(json_view(window))
    else:
        print(f"maintenance {window.id}: {window.selector} {window.asset or 'all assets'}, "
              f"{_period(window)}")  # fmt: skip
    return 0


def _period(window: operator_pb2.MaintenanceWindow) -> str:
    starts = window.starts_at.ToDatetime(tzinfo=dt.UTC)
    if not window.HasField("ends_at"):
        return f"out of service from {starts:%Y-%m-%d %H:%M} UTC until removed"
    ends = window.ends_at.ToDatetime(tzinfo=dt.UTC)
    return f"{starts:%Y-%m-%d %H:%M} to {ends:%Y-%m-%d %H:%M} UTC"


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    windows = client.list_maintenance(include_ended=args.all)
    if args.json:
        print_json([json_view(w) for w in windows])
        return 0
    print_table(
        ["ID", "SELECTOR", "ASSET", "WHEN", "BY", "REASON"],
        [
            [w.id[:8], w.selector, w.asset or "*", _period(w), w.created_by, w.reason[:40]]
            for w in windows
        ],
    )
    return 0


def cmd_remove(args: argparse.Namespace, client: OperatorClient) -> int:
    window = client.remove_maintenance(args.id)
    print(f"maintenance {window.id} removed ({window.selector})")
    return 0
