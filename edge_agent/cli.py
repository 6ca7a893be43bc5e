"""Entry point of `autoglm-edge`: enroll a device, run the agent."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import __version__
from edge_agent.bootstrap import read_bootstrap
from edge_agent.config import load_agent_config
from edge_agent.enroll import enroll
from edge_agent.errors import AutoglmError, ConfigError, report
from edge_agent.files import exclusive_lock
from edge_agent.logs import setup_logging
from edge_agent.settings import check_listen
from edge_agent.simulate import Fault, Stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm-edge", description="Open-AutoGLM Edge agent.")
    parser.add_argument("--version", action="version", version=f"autoglm-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enroll_p = sub.add_parser("enroll", help="enroll this device with a bootstrap file")
    enroll_p.add_argument("--bootstrap", required=True, type=Path)
    enroll_p.add_argument("--state-dir", required=True, type=Path)
    enroll_p.add_argument(
        "--name", default="", help="with a group's bootstrap: this device's name "
        "(default: the host name)"
    )  # fmt: skip
    enroll_p.set_defaults(handler=cmd_enroll)

    run_p = sub.add_parser("run", help="run the agent")
    run_p.add_argument("--config", type=Path, help="agent.yaml (see edge_agent/agent.example.yaml)")
    run_p.add_argument("--state-dir", type=Path, help="overrides state_dir of the config")
    run_p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    run_p.add_argument(
        "--log-format", choices=("text", "json"), help="json: one object per line, with ids"
    )
    run_p.set_defaults(handler=cmd_run)

    status = sub.add_parser(
        "status", help="what the state directory says: identity, models, alerts, outbox"
    )
    status.add_argument("--config", type=Path, help="agent.yaml (for its state_dir)")
    status.add_argument("--state-dir", type=Path, help="overrides state_dir of the config")
    status.set_defaults(handler=cmd_status)

    check = sub.add_parser(
        "check",
        help="check config, state dir, identity and clock, broker, control plane and model",
    )
    check.add_argument("--config", type=Path, help="agent.yaml")
    check.add_argument("--state-dir", type=Path, help="overrides state_dir of the config")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=cmd_check)

    sim = sub.add_parser(
        "simulate",
        help="publish a simulated pump stream (with faults) or replay a CSV to a broker",
    )
    sim.add_argument("--broker", default="localhost:1883", help="HOST:PORT of the site broker")
    sim.add_argument("--username", default="")
    sim.add_argument("--password", default="")
    sim.add_argument(
        "--prefix",
        default="plant/pump-{i}",
        help="topic prefix per asset; {i} is the asset number (default plant/pump-{i})",
    )
    sim.add_argument("--assets", type=int, default=1, help="how many assets (default 1)")
    sim.add_argument("--csv", type=Path, help="replay this CSV instead of the simulated pump")
    sim.add_argument("--time-column", default="datetime")
    sim.add_argument("--duration", type=int, default=900, help="seconds of pump data (900)")
    sim.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND@START+SECONDS",
        help="inject a fault, e.g. cavitation@500+120 (kinds: cavitation, bearing, overheat); "
        "repeat for more",
    )
    sim.add_argument("--speed", type=float, default=1.0, help="x real time; 0: flat out")
    sim.add_argument("--batch", type=int, default=1, help="readings per message (1: single)")
    sim.add_argument("--qos", type=int, choices=(0, 1), default=1)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--protocol",
        choices=("json", "sparkplug", "modbus", "opcua"),
        default="json",
        help="json: our payloads under --prefix; sparkplug: a Sparkplug B edge node whose "
        "devices --device are the assets (DDATA of --batch rows); modbus, opcua: serve the "
        "streams on --listen as a PLC would (no broker)",
    )
    sim.add_argument(
        "--listen", default="", help="modbus/opcua: HOST:PORT to serve on (5020 / 4840)"
    )
    sim.add_argument("--group", default="plant", help="sparkplug: the group id")
    sim.add_argument("--edge-node", default="gateway-1", help="sparkplug: the edge node id")
    sim.add_argument(
        "--device", default="pump-{i}", help="sparkplug: device id per asset; {i}: its number"
    )
    sim.set_defaults(handler=cmd_simulate)
    return parser


def cmd_enroll(args: argparse.Namespace) -> int:
    bootstrap = read_bootstrap(args.bootstrap)
    info = enroll(bootstrap, args.state_dir.absolute(), name=args.name)
    print(
        f"enrolled as {info.device_name} ({info.device_id}); identity in {args.state_dir}/identity"
    )
    print(f"next: autoglm-edge run --state-dir {args.state_dir}")
    return 0


LOCK_FILE = "agent.lock"


def _device_name(state_dir: Path) -> str:
    """The enrolled device's name for every log line ("" before enrollment)."""
    from edge_agent.identity import load_identity

    try:
        return load_identity(state_dir).info.device_name
    except AutoglmError:
        return ""


def cmd_run(args: argparse.Namespace) -> int:
    if args.config is None and args.state_dir is None:
        raise ConfigError("give --config agent.yaml or --state-dir DIR")
    overrides = {
        "state_dir": args.state_dir,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    config = load_agent_config(args.config, overrides)
    setup_logging(config.log_level, config.log_format, device=_device_name(config.state_dir))
    from edge_agent.agent import Agent, run_until_signalled

    # Two agents on one state directory would share an outbox, slots and an MQTT client id
    # (and kick each other off the broker): the second one stops here, naming the first.
    with exclusive_lock(config.state_dir / LOCK_FILE, "autoglm-edge run"):
        asyncio.run(run_until_signalled(Agent(config)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """JSON of the state directory (the agent may be running: everything is read only)."""
    from edge_agent.status import read_status

    if args.config is None and args.state_dir is None:
        raise ConfigError("give --config agent.yaml or --state-dir DIR")
    overrides = {"state_dir": args.state_dir} if args.state_dir else {}
    state_dir = load_agent_config(args.config, overrides).state_dir
    if not state_dir.is_dir():
        raise ConfigError(f"state_dir {state_dir}: no such directory")
    print(json.dumps(read_status(state_dir), indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit status 0 when nothing failed (warnings are listed), 1 otherwise."""
    from edge_agent.check import FAIL, WARN, run_checks

    overrides = {"state_dir": args.state_dir} if args.state_dir else {}
    checks = run_checks(args.config, overrides, args.timeout)
    failed = sum(c.outcome == FAIL for c in checks)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{c.outcome:8s} {c.name:14s} {c.detail}")
        warned = sum(c.outcome == WARN for c in checks)
        print()
        print(
            f"{failed} check(s) failed" if failed else f"ready ({warned} warning(s))",
        )
    return 1 if failed else 0


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


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--broker {text!r}: give HOST:PORT, e.g. localhost:1883")
    return host, int(port)


def _serve(args: argparse.Namespace, streams: list[Stream]) -> int:
    from edge_agent.simulate_servers import serve_modbus, serve_opcua

    default = "0.0.0.0:5020" if args.protocol == "modbus" else "0.0.0.0:4840"
    text = args.listen or default
    try:
        host, _, port = check_listen(text, optional=False).rpartition(":")
    except ValueError as exc:
        raise ConfigError(f"--listen {text!r}: {exc}, e.g. {default}") from None
    if args.speed <= 0:
        raise ConfigError("--speed must be above 0 when serving: the rows are served in time")
    serve = serve_modbus if args.protocol == "modbus" else serve_opcua
    rows = serve(host, int(port), streams, args.speed)
    print(f"served {rows} rows")
    return 0


def _fault(text: str) -> Fault:
    kind, at, rest = text.partition("@")
    start, plus, length = rest.partition("+")
    try:
        if not at or not plus:
            raise ValueError
        return Fault(kind, float(start), float(length))
    except ValueError:
        raise ConfigError(
            f"--fault {text!r}: give KIND@START+SECONDS, e.g. cavitation@500+120"
        ) from None


def cmd_simulate(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt

    from edge_agent.ingest.mqtt import new_client
    from edge_agent.simulate import publish_streams, pump_stream, read_csv_stream

    host, port = _broker(args.broker)
    if args.assets < 1:
        raise ConfigError("--assets must be at least 1")
    faults = [_fault(f) for f in args.fault]
    streams = []
    for i in range(1, args.assets + 1):
        if args.csv is not None:
            stream = read_csv_stream(args.csv, args.time_column)
        else:
            stream = pump_stream(args.duration, faults, seed=args.seed + i)
        streams.append((args.prefix.format(i=i), stream))
    if args.protocol in ("modbus", "opcua"):
        return _serve(args, [stream for _, stream in streams])
    client = new_client()
    client.max_inflight_messages_set(1000)
    if args.username:
        client.username_pw_set(args.username, args.password or None)
    node = None
    if args.protocol == "sparkplug":
        from edge_agent.simulate_sparkplug import SimulatedNode

        devices = [args.device.format(i=i) for i in range(1, args.assets + 1)]
        streams = [(d, s) for d, (_, s) in zip(devices, streams, strict=True)]
        node = SimulatedNode(args.group, args.edge_node, [(d, s.sensors) for d, s in streams])
        client.will_set(*node.death(), qos=1)
    try:
        client.connect(host, port)
    except OSError as exc:
        raise ConfigError(f"--broker {args.broker}: cannot connect: {exc}") from None
    client.loop_start()
    last: list[mqtt.MQTTMessageInfo] = []

    def publish(topic: str, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=args.qos)
        last[:] = [info]

    try:
        for prefix, stream in streams:
            where = f"{prefix}/..." if node is None else node.topic("DDATA", prefix)
            print(
                f"publishing {stream.values.shape[0]} rows x {len(stream.sensors)} sensors to "
                f"{where} at {args.speed:g}x"
                + (f"; faults: {', '.join(args.fault)}" if args.fault and not args.csv else "")
            )
        if node is None:
            sent = publish_streams(publish, streams, args.speed, args.batch)
        else:
            from edge_agent.simulate_sparkplug import publish_node

            sent = publish_node(publish, node, streams, args.speed, args.batch)
            publish(*node.death())  # leaving: the node's death certificate
        if last:
            last[0].wait_for_publish(timeout=60)
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"published {sent} messages")
    return 0
