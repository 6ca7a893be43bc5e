"""`autoglm demo`: the end-to-end demo on embedded defaults (see cloud/demo.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from cloud.cli.numbers import MAX_EPOCHS, decimal, whole


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole system here: control plane, broker, training, rollout, alerts",
    )
    demo.add_argument(
        "--duration",
        type=decimal(0, 7 * 86_400),
        default=60.0,
        help="seconds of live streaming (default 60)",
    )
    demo.add_argument(
        "--agents", type=whole(1, 3), default=2, help="edge agents, 1 to 3 (default 2)"
    )
    demo.add_argument("--data", type=Path, help="train on these CSV/Parquet files instead")
    demo.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="auto: Mosquitto when installed, else the embedded Python broker (amqtt)",
    )
    demo.add_argument("--epochs", type=whole(1, MAX_EPOCHS), default=6)
    demo.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    demo.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    demo.add_argument(
        "--console",
        action="store_true",
        help="serve the web console on 127.0.0.1 and keep everything running after the "
        "scenario until Ctrl-C",
    )
    demo.add_argument(
        "--console-port",
        type=whole(0, 65_535),
        default=0,
        help="the console's port (default: any free one)",
    )
    demo.set_defaults(handler=cmd_demo, needs_client=False)


def cmd_demo(args: argparse.Namespace) -> int:
    from cloud.demo import Demo, DemoOptions, DemoSummary, print_summary

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The demo prints alerts as the watch stream delivers them; the agents' own fault log
    # lines and ONNX Runtime's quantization advice would only repeat or distract.
    logging.getLogger("edge_agent.runtime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("cloud").setLevel(logging.WARNING)
    logging.getLogger("edge_agent").setLevel(logging.WARNING)
    options = DemoOptions(
        duration_s=args.duration,
        agents=args.agents,
        data=args.data,
        broker=args.broker,
        epochs=args.epochs,
        keep=args.keep,
        console=args.console,
        console_port=args.console_port,
    )
    demo = Demo(options, sys.stdout, sys.stderr)

    def report(summary: DemoSummary) -> None:
        if args.json:
            doc = {k: v for k, v in summary.to_json().items() if k != "alerts"}
            sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
        else:
            print_summary(summary, sys.stdout)
        sys.stdout.flush()

    def hold(summary: DemoSummary) -> None:
        report(summary)
        try:  # before saying so: a Ctrl-C right after the line must land in here
            demo.say(f"console still serving on {demo.console_url}; press Ctrl-C to stop")
            threading.Event().wait()
        except KeyboardInterrupt:
            demo.say("stopping")

    summary = demo.run(hold if args.console else None)
    if not args.console:
        report(summary)
    return 0 if summary.faults_detected > 0 else 1
