"""`autoglm alerts ...` and `autoglm device predictions`."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys

from cloud.cli.numbers import UINT32_MAX, whole
from cloud.cli.output import ago, json_view, parse_duration, print_json, print_table
from cloud.client import OperatorClient
from cloud.domain import VERDICTS
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2, operator_pb2

STATES = {
    "firing": operator_pb2.Alert.STATE_FIRING,
    "acknowledged": operator_pb2.Alert.STATE_ACKNOWLEDGED,
    "resolved": operator_pb2.Alert.STATE_RESOLVED,
    "returned": operator_pb2.Alert.STATE_RETURNED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
TIMELINE_BEFORE = dt.timedelta(minutes=5)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alerts = sub.add_parser(
        "alerts", help="equipment-fault alerts: list, watch, ack, resolve, shelve"
    )
    asub = alerts.add_subparsers(dest="alerts_command", required=True, metavar="COMMAND")
    listing = asub.add_parser("list", help="alerts, most recently seen first")
    _filters(listing)
    listing.add_argument("--since", default="", help="seen in the last 90s, 15m, 24h, 7d")
    listing.add_argument(
        "--verdict", choices=[*VERDICTS, "none"], help="only alerts with this verdict (none: yet)"
    )
    listing.add_argument("--limit", type=whole(1, UINT32_MAX), default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_list, needs_client=True)
    watch = asub.add_parser("watch", help="print alerts as they open, change and resolve")
    _filters(watch)
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.set_defaults(handler=cmd_watch, needs_client=True)
    show = asub.add_parser("show", help="one alert: score timeline, top sensors, notes")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show, needs_client=True)
    for action, text in (
        ("ack", "acknowledge: someone is on it (closes a returned alert)"),
        ("resolve", "close it (on a closed alert: record a --verdict)"),
    ):
        p = asub.add_parser(action, help=text)
        p.add_argument("id")
        p.add_argument("--note", default="")
        p.add_argument(
            "--verdict", choices=VERDICTS, default="", help="was the fault real? (model labels)"
        )
        p.add_argument("--fault-type", default="", help="what was found, e.g. bearing-wear")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_action, action=action, needs_client=True)
    shelve = asub.add_parser(
        "shelve", help="keep an alert from being delivered for a while (it is still stored)"
    )
    shelve.add_argument("id")
    shelve.add_argument("--for", dest="duration", required=True, help="e.g. 30m, 8h, 2d")
    shelve.add_argument("--reason", required=True)
    shelve.add_argument("--json", action="store_true")
    shelve.set_defaults(handler=cmd_shelve, needs_client=True)
    unshelve = asub.add_parser("unshelve", help="end a shelving now")
    unshelve.add_argument("id")
    unshelve.add_argument("--json", action="store_true")
    unshelve.set_defaults(handler=cmd_shelve, duration="", needs_client=True)


def add_device_parsers(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = dsub.add_parser("predictions", help="scored windows a device synced")
    p.add_argument("device", help="id or name")
    p.add_argument("--asset", default="")
    p.add_argument("--since", default="", help="windows ending in the last 90s, 15m, 24h, 7d")
    p.add_argument("--limit", type=whole(1, UINT32_MAX), default=1000)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--csv", action="store_true")
    p.set_defaults(handler=cmd_predictions, needs_client=True)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=sorted(STATES), help="only alerts in this state")
    p.add_argument("--device", default="", help="only this device (id or name)")


def _since(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise InvalidInput(f"--since: {exc}") from None


def _limit(value: int) -> int:
    if value < 1:
        raise InvalidInput(f"--limit must be at least 1, got {value}")
    return value


def _sensors(alert: operator_pb2.Alert, n: int = 3) -> str:
    return ", ".join(f"{s.sensor} {s.contribution:.2f}" for s in alert.top_sensors[:n])


def _state(alert: operator_pb2.Alert) -> str:
    state = STATE_NAMES.get(alert.state, "?")
    if alert.suppressed_by:
        state += f" ({alert.suppressed_by.split(' ')[0]})"
    return state


def _row(alert: operator_pb2.Alert, now: dt.datetime) -> list[str]:
    return [
        alert.id[:8],
        _state(alert),
        alert.severity,
        alert.device_name,
        alert.asset,
        alert.fault,
        f"{alert.peak_score:.2f}",
        ago(alert.first_seen.ToDatetime(tzinfo=dt.UTC), now),
        alert.verdict or "-",
        _sensors(alert),
    ]


HEADERS = [
    "ID", "STATE", "SEVERITY", "DEVICE", "ASSET", "FAULT", "PEAK", "SINCE", "VERDICT",
    "TOP SENSORS",
]  # fmt: skip


def cmd_list(args: argparse.Namespace, client: OperatorClient) -> int:
    request = operator_pb2.ListAlertsRequest(
        state=STATES.get(args.state or "", 0),  # type: ignore[arg-type]
        device=args.device,
        limit=_limit(args.limit),
        verdict=args.verdict or "",
    )
    if (since := _since(args.since)) is not None:
        request.since.FromDatetime(since)
    alerts = client.list_alerts(request)
    if args.json:
        print_json([json_view(a) for a in alerts])
        return 0
    now = dt.datetime.now(dt.UTC)
    print_table(HEADERS, [_row(a, now) for a in alerts])
    return 0


def cmd_watch(args: argparse.Namespace, client: OperatorClient) -> int:
    request = operator_pb2.WatchAlertsRequest(
        state=STATES.get(args.state or "", 0),  # type: ignore[arg-type]
        device=args.device,
    )
    if not args.json:
        print("watching alerts (Ctrl-C to stop)", file=sys.stderr)
    try:
        for alert in client.watch_alerts(request):
            if args.json:
                sys.stdout.write(json.dumps(json_view(alert), sort_keys=True) + "\n")
            else:
                first = alert.first_seen.ToDatetime(tzinfo=dt.UTC)
                sys.stdout.write(
                    f"{dt.datetime.now(dt.UTC):%H:%M:%S} {_state(alert):<12} {alert.severity:<8} "
                    f"{alert.device_name}/{alert.asset} {alert.fault} peak "
                    f"{alert.peak_score:.2f} since {first:%H:%M:%S} [{_sensors(alert)}] "
                    f"{alert.id}\n"
                )
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def _moved(when: dt.datetime, by: dt.timedelta) -> dt.datetime:
    """`when` moved by `by`, held at the calendar's ends: an alert's times are a device's,
    and one stored before the control plane bounded them may be at 0001-01-01 or 9999-12-31."""
    try:
        return when + by
    except OverflowError:
        end = dt.datetime.min if by < dt.timedelta(0) else dt.datetime.max
        return end.replace(tzinfo=dt.UTC)


def cmd_show(args: argparse.Namespace, client: OperatorClient) -> int:
    alert = client.get_alert(args.id)
    request = operator_pb2.QueryPredictionsRequest(
        device=alert.device_id, asset=alert.asset, limit=100_000
    )
    request.since.FromDatetime(_moved(alert.first_seen.ToDatetime(tzinfo=dt.UTC), -TIMELINE_BEFORE))
    if alert.HasField("resolved_at"):  # the newest windows asked for are the alert's
        request.until.FromDatetime(
            _moved(alert.resolved_at.ToDatetime(tzinfo=dt.UTC), TIMELINE_BEFORE)
        )
    timeline = client.query_predictions(request)
    if args.json:
        doc = json_view(alert)
        doc["timeline"] = [
            {"window_end": p.window_end.ToJsonString(), "score": p.score, "anomalous": p.anomalous}
            for p in timeline
        ]
        print_json(doc)
        return 0
    now = dt.datetime.now(dt.UTC)
    print(f"alert {alert.id}: {_state(alert)}, severity {alert.severity}")
    print(f"  device {alert.device_name}  asset {alert.asset}  fault {alert.fault}")
    print(f"  first seen {ago(alert.first_seen.ToDatetime(tzinfo=dt.UTC), now)}, last seen "
          f"{ago(alert.last_seen.ToDatetime(tzinfo=dt.UTC), now)}; peak score "
          f"{alert.peak_score:.2f} (model {alert.model_version}); "
          f"{alert.raised_events} raise event(s)")  # fmt: skip
    if alert.HasField("resolved_at"):
        resolved = alert.resolved_at.ToDatetime(tzinfo=dt.UTC)
        what = "returned to normal" if alert.state == STATES["returned"] else "resolved by"
        print(f"  {what} {alert.resolved_by} {ago(resolved, now)}")
    if alert.acknowledged_by:
        print(f"  acknowledged by {alert.acknowledged_by}")
    if alert.HasField("shelved_until"):
        until = alert.shelved_until.ToDatetime(tzinfo=dt.UTC)
        print(f"  shelved by {alert.shelved_by} until {until:%Y-%m-%d %H:%M} UTC: "
              f"{alert.shelve_reason}")  # fmt: skip
    if alert.suppressed_by:
        print(f"  not delivered now: {alert.suppressed_by}")
    if alert.verdict:
        found = f" ({alert.fault_type})" if alert.fault_type else ""
        print(f"  verdict: {alert.verdict}{found}")
    print("  top sensors: " + (_sensors(alert, 10) or "-"))
    for note in alert.notes:
        print(f"  note: {note}")
    if timeline:
        print(f"\n  score timeline ({len(timeline)} windows; # = 0.1, | = threshold 1.0):")
        step = max(1, len(timeline) // 40)
        for p in timeline[::step]:
            bar = "#" * min(30, round(p.score * 10))
            mark = (bar[:10] + "|" + bar[10:]) if len(bar) > 10 else bar
            print(f"  {p.window_end.ToDatetime():%H:%M:%S} {p.score:5.2f} {mark}")
    return 0


def cmd_action(args: argparse.Namespace, client: OperatorClient) -> int:
    alert = client.alert_action(args.action, args.id, args.note, args.verdict, args.fault_type)
    if args.json:
        print_json(json_view(alert))
    else:
        verdict = f", verdict {alert.verdict}" if alert.verdict else ""
        print(f"alert {alert.id}: {_state(alert)}{verdict}")
    return 0


def cmd_shelve(args: argparse.Namespace, client: OperatorClient) -> int:
    if args.duration:
        try:
            seconds = parse_duration(args.duration)
        except ValueError as exc:
            raise InvalidInput(f"--for: {exc}") from None
        alert = client.shelve_alert(args.id, seconds, args.reason)
    else:
        alert = client.unshelve_alert(args.id)
    if args.json:
        print_json(json_view(alert))
    elif alert.HasField("shelved_until"):
        until = alert.shelved_until.ToDatetime(tzinfo=dt.UTC)
        print(f"alert {alert.id}: shelved until {until:%Y-%m-%d %H:%M} UTC")
    else:
        print(f"alert {alert.id}: {_state(alert)}, delivered again")
    return 0


def cmd_predictions(args: argparse.Namespace, client: OperatorClient) -> int:
    request = operator_pb2.QueryPredictionsRequest(
        device=args.device, asset=args.asset, limit=_limit(args.limit)
    )
    if (since := _since(args.since)) is not None:
        request.since.FromDatetime(since)
    predictions = client.query_predictions(request)
    if args.json:
        print_json([json_view(p) for p in predictions])
    elif args.csv:
        _write_csv(predictions)
    else:
        print_table(
            ["WINDOW END", "ASSET", "SCORE", "ANOMALOUS", "MODEL", "TOP SENSOR"],
            [
                [
                    p.window_end.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    p.asset,
                    f"{p.score:.3f}",
                    "yes" if p.anomalous else "",
                    p.model_version,
                    max(p.contributions.items(), key=lambda kv: kv[1])[0]
                    if p.contributions
                    else "",
                ]
                for p in predictions
            ],
        )
    return 0


def _write_csv(predictions: list[agent_pb2.Prediction]) -> None:
    sensors = sorted({name for p in predictions for name in p.contributions})
    writer = csv.writer(sys.stdout)
    writer.writerow(
        ["window_start", "window_end", "asset", "score", "anomalous", "model_version"]
        + [f"contribution_{s}" for s in sensors]
    )
    for p in predictions:
        writer.writerow(
            [
                p.window_start.ToJsonString(),
                p.window_end.ToJsonString(),
                p.asset,
                f"{p.score:.6f}",
                int(p.anomalous),
                p.model_version,
                *(f"{p.contributions.get(s, 0.0):.6f}" for s in sensors),
            ]
        )
