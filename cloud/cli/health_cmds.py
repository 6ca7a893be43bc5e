"""`autoglm model health [MODEL_VERSION]`: the fleet's sites ranked by drift, from the model
health every agent reports in its heartbeats (`edge_agent/drift.py`)."""

from __future__ import annotations

import argparse

from cloud.cli.output import print_json, print_table
from cloud.client import OperatorClient
from protos.autoglm.v1 import agent_pb2, operator_pb2


def add_model_parsers(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = msub.add_parser(
        "health", help="sites serving a model, most drifted first (input shift, scores, alerts)"
    )
    health.add_argument("version", nargs="?", default="", help="only devices serving it")
    health.add_argument("--selector", default="", help="only devices with these labels")
    health.add_argument("--json", action="store_true")
    health.set_defaults(handler=cmd_health, needs_client=True)


def drift_line(asset: str, d: agent_pb2.AssetDrift) -> str:
    return (
        f"{asset}: shift {d.input_shift:.1f} sd ({d.input_shift_sensor or '-'}), spread "
        f"x{d.spread_ratio:.2f}, masked {100 * d.masked_fraction:.0f} %, score median "
        f"{d.score_median:.2f}, {d.alerts_per_day:.1f} alerts/day over {d.rows} rows"
    )


def ranked(
    devices: list[operator_pb2.Device], version: str
) -> list[tuple[operator_pb2.Device, str, agent_pb2.AssetDrift]]:
    rows = [
        (device, asset, drift)
        for device in devices
        if not version or device.status.model_version == version
        for asset, drift in device.status.health.drift.items()
    ]
    return sorted(rows, key=lambda r: (-r[2].input_shift, -r[2].score_median))


def cmd_health(args: argparse.Namespace, client: OperatorClient) -> int:
    rows = ranked(client.list_devices(args.selector), args.version)
    if args.json:
        print_json(
            [
                {
                    "device": device.name,
                    "model_version": device.status.model_version,
                    "asset": asset,
                    "input_shift": d.input_shift,
                    "input_shift_sensor": d.input_shift_sensor,
                    "spread_ratio": d.spread_ratio,
                    "masked_fraction": d.masked_fraction,
                    "score_median": d.score_median,
                    "alerts_per_day": d.alerts_per_day,
                    "rows": d.rows,
                }
                for device, asset, d in rows
            ]
        )
        return 0
    print_table(
        ["DEVICE", "MODEL", "ASSET", "SHIFT (SD)", "SENSOR", "SPREAD", "MASKED", "SCORE P50",
         "ALERTS/DAY"],
        [
            [device.name, device.status.model_version, asset, f"{d.input_shift:.1f}",
             d.input_shift_sensor or "-", f"x{d.spread_ratio:.2f}",
             f"{100 * d.masked_fraction:.0f} %", f"{d.score_median:.2f}",
             f"{d.alerts_per_day:.1f}"]
            for device, asset, d in rows
        ],
    )  # fmt: skip
    return 0
