"""`autoglm data export`: captured windows with their verdicts -> Parquet for retraining."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.cli.numbers import whole
from cloud.cli.output import parse_duration
from cloud.client import OperatorClient
from cloud.domain import VERDICTS
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

if TYPE_CHECKING:  # numpy: only when exporting
    from cloud.captures import CaptureLabel, CaptureRecord


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="retraining data: captured windows and their verdicts")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    export = dsub.add_parser(
        "export", help="captured windows, labelled by verdicts, as Parquet for `model train`"
    )
    export.add_argument(
        "--since", required=True, help="windows ending in the last 90s, 15m, 24h, 30d"
    )
    export.add_argument("--selector", default="", help="only devices with these labels")
    export.add_argument("--device", default="", help="only this device (id or name)")
    export.add_argument(
        "--verdict",
        default="",
        choices=[*VERDICTS, "none"],
        help="only alert windows with this verdict; none: windows nobody judged (sampled "
        "normal ones too); default: every window",
    )
    export.add_argument(
        "--page-size", type=whole(1, 1000), default=200, help="windows per page (<= 1000)"
    )
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    export.set_defaults(handler=cmd_export, needs_client=True)


def _windows(
    client: OperatorClient, request: operator_pb2.ListCapturesRequest
) -> Iterator[tuple[CaptureRecord, CaptureLabel, str]]:
    from cloud.captures import CaptureLabel
    from cloud.service.records import capture_from_proto  # checks each window again

    for window in client.list_captures(request):
        where = f"device {window.device_name} sequence {window.sequence}"
        capture = capture_from_proto(window.device_id, window.sequence, window.capture, where)
        label = CaptureLabel(window.alert_id, window.verdict, window.fault_type)
        yield capture, label, window.device_name


def cmd_export(args: argparse.Namespace, client: OperatorClient) -> int:
    from cloud.model.capture_data import write_export  # pyarrow: only here

    try:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(args.since))
    except ValueError as exc:
        raise InvalidInput(f"--since: {exc}") from None
    request = operator_pb2.ListCapturesRequest(
        selector=args.selector,
        device=args.device,
        verdict=args.verdict,
        page_size=args.page_size,
    )
    request.since.FromDatetime(since)
    query = {
        "since": since.isoformat(timespec="seconds"),
        "selector": args.selector,
        "device": args.device,
        "verdict": args.verdict,
    }
    summary = write_export(_windows(client, request), args.out, query)
    labels = ", ".join(f"{k} {v}" for k, v in sorted(summary.labels.items())) or "none"
    print(f"wrote {args.out}: {summary.windows} windows ({labels})")
    return 0
