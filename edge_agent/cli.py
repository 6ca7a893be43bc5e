"""Entry point of `autoglm-edge`: enroll a device, run the agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.bootstrap import read_bootstrap
from edge_agent.config import load_agent_config
from edge_agent.enroll import enroll
from edge_agent.errors import AutoglmError, ConfigError, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm-edge", description="Open-AutoGLM Edge agent.")
    parser.add_argument("--version", action="version", version=f"autoglm-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enroll_p = sub.add_parser("enroll", help="enroll this device with a bootstrap file")
    enroll_p.add_argument("--bootstrap", required=True, type=Path)
    enroll_p.add_argument("--state-dir", required=True, type=Path)
    enroll_p.set_defaults(handler=cmd_enroll)

    run_p = sub.add_parser("run", help="run the agent")
    run_p.add_argument("--config", type=Path, help="agent.yaml (see edge_agent/agent.example.yaml)")
    run_p.add_argument("--state-dir", type=Path, help="overrides state_dir of the config")
    run_p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    run_p.set_defaults(handler=cmd_run)
    return parser


def cmd_enroll(args: argparse.Namespace) -> int:
    bootstrap = read_bootstrap(args.bootstrap)
    info = enroll(bootstrap, args.state_dir.absolute())
    print(
        f"enrolled as {info.device_name} ({info.device_id}); identity in {args.state_dir}/identity"
    )
    print(f"next: autoglm-edge run --state-dir {args.state_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.config is None and args.state_dir is None:
        raise ConfigError("give --config agent.yaml or --state-dir DIR")
    overrides = {"state_dir": args.state_dir, "log_level": args.log_level}
    config = load_agent_config(args.config, overrides)
    level = getattr(logging, config.log_level.upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"log_level '{config.log_level}' is not DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_agent.agent import Agent, run_until_signalled

    asyncio.run(run_until_signalled(Agent(config)))
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except AutoglmError as exc:
        return report("autoglm-edge", exc)
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run())
