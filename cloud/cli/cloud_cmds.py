"""`autoglm cloud init` and `autoglm cloud serve` (the key and CA commands: trust_cmds)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.cli import trust_cmds
from cloud.cli.context import CliContext, default_context_path, save_context
from cloud.cli.numbers import INT32_MAX, MAX_WORKERS, whole
from edge_agent.errors import ConfigError, LocalStateError
from edge_agent.files import exclusive_lock
from edge_agent.logs import setup_logging

if TYPE_CHECKING:
    from cloud.config import CloudConfig
    from cloud.service.server import ControlPlane


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cloud = sub.add_parser("cloud", help="run and set up the control plane")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")

    init = cloud_sub.add_parser("init", help="create CA, keys, store and a first operator token")
    init.add_argument("--state-dir", required=True, type=Path)
    init.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="name or address that agents and operators dial (repeatable); in the server cert",
    )
    init.add_argument(
        "--database-url", default="", help="PostgreSQL URL; default: SQLite in the state dir"
    )
    init.add_argument(
        "--api-listen", help="HOST:PORT for enrollment and operator calls (default 0.0.0.0:7443)"
    )
    init.add_argument("--device-listen", help="HOST:PORT for device calls (default 0.0.0.0:7444)")
    init.add_argument(
        "--login",
        action="store_true",
        help="also save the connection and token as this user's CLI context (like `autoglm login`)",
    )
    init.set_defaults(handler=cmd_init)

    serve = cloud_sub.add_parser(
        "serve", help="serve the gRPC API (TLS) and device port (mutual TLS)"
    )
    serve.add_argument("--state-dir", required=True, type=Path)
    serve.add_argument("--api-listen")
    serve.add_argument("--device-listen")
    serve.add_argument(
        "--console-listen", help="HOST:PORT for the web console (plain HTTP; default: none)"
    )
    serve.add_argument("--database-url")
    serve.add_argument(
        "--ports-file", type=Path, help="write the bound ports here as JSON once serving"
    )
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default from config: INFO)")
    serve.add_argument(
        "--log-format", choices=("text", "json"), help="json: one object per line, with ids"
    )
    serve.add_argument(
        "--workers",
        type=whole(1, MAX_WORKERS),
        help="processes sharing the API and device ports (default from config: 1; more than "
        "one needs PostgreSQL)",
    )
    # Set by `--workers N`'s supervisor for each worker it starts.
    serve.add_argument("--worker", type=whole(0, MAX_WORKERS - 1), help=argparse.SUPPRESS)
    serve.add_argument("--supervisor", type=whole(1, INT32_MAX), help=argparse.SUPPRESS)
    serve.set_defaults(handler=cmd_serve)

    trust_cmds.add_parsers(cloud_sub)


def cmd_init(args: argparse.Namespace) -> int:
    from cloud.state_dir import CA_CERT, init_state_dir  # the CLI loads no server code for --help

    result = init_state_dir(
        args.state_dir,
        hosts=args.host,
        database_url=args.database_url,
        api_listen=args.api_listen,
        device_listen=args.device_listen,
    )
    config = result.config
    api_port = config.api_listen.rpartition(":")[2]
    server = f"{config.public_host}:{api_port}"
    ca_path = config.state_dir / CA_CERT
    print(f"Initialised the control plane in {config.state_dir}")
    print(f"  store:   {'PostgreSQL' if config.database_url else 'SQLite'}")
    print(f"  hosts:   {', '.join(config.hosts)}")
    print(f"  CA:      {ca_path}")
    print("")
    print("Operator token for 'admin' (shown once, store it safely):")
    print(f"  {result.operator_token}")
    if args.login:
        if api_port == "0":
            raise ConfigError("--login needs a fixed --api-listen port, not 0")
        context = CliContext(server=server, ca_cert=str(ca_path), token=result.operator_token)
        path = default_context_path(os.environ)
        save_context(path, context)
        print(f"\nSaved the CLI context to {path}")
    else:
        shown = server if api_port != "0" else f"{config.public_host}:<api port serve reports>"
        print("\nNext: autoglm cloud serve --state-dir", config.state_dir)
        print(f"      autoglm login --server {shown} --ca-cert {ca_path} --token <token>")
    return 0


SERVE_LOCK = "serve.lock"


def cmd_serve(args: argparse.Namespace) -> int:
    from cloud.config import load_cloud_config
    from cloud.leader import default_replica_id
    from cloud.service.workers import check_plan, follow_supervisor, shifted

    overrides = {
        "api_listen": args.api_listen,
        "device_listen": args.device_listen,
        "console_listen": args.console_listen,
        "database_url": args.database_url,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "workers": args.workers,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None and v != ""}
    config = load_cloud_config(args.state_dir.absolute(), overrides)
    index = args.worker
    if index is not None and args.supervisor is not None:
        follow_supervisor(args.supervisor)
    check_plan(config)
    if index is None and config.workers > 1:
        setup_logging(config.log_level, config.log_format, replica=config.replica_id or "workers")
        return _supervise(args, config)
    if index is not None:  # one of a supervisor's workers: its own probe and metrics ports
        config = config.model_copy(
            update={
                "replica_id": f"{config.replica_id or default_replica_id()}-w{index}",
                "health_listen": shifted(config.health_listen, index),
                "metrics_listen": shifted(config.metrics_listen, index),
                "console_listen": config.console_listen if index == 0 else "",
            }
        )
    setup_logging(
        config.log_level, config.log_format, replica=config.replica_id or default_replica_id()
    )
    return _serve_one(config, args.ports_file, share_ports=index is not None)


def _serve_one(config: CloudConfig, ports_file: Path | None, share_ports: bool) -> int:
    from cloud.service.server import ControlPlane
    from cloud.state_dir import load_secrets
    from cloud.store import open_store

    secrets = load_secrets(config.state_dir)
    with contextlib.ExitStack() as held:
        if config.resolved_database_url.startswith("sqlite"):
            # One writer per SQLite state; replicas share a PostgreSQL database instead.
            held.enter_context(exclusive_lock(config.state_dir / SERVE_LOCK, "autoglm cloud serve"))
        store = open_store(config.resolved_database_url)
        try:
            plane = ControlPlane(config, secrets, store, share_ports=share_ports)
            asyncio.run(_serve(plane, ports_file, announce=not share_ports))
        finally:
            store.close()
    return 0


def _supervise(args: argparse.Namespace, config: CloudConfig) -> int:
    """Starts `config.workers` copies of this command, each with `--worker K`."""
    import cloud
    from cloud.service.workers import WorkerPool

    def command(index: int, api: str, device: str, ports_file: Path) -> list[str]:
        # -P: not some other `cloud` package in the working directory.
        argv = [sys.executable, "-P", "-m", "cloud.cli.main", "cloud", "serve"]
        argv += ["--state-dir", str(config.state_dir), "--worker", str(index)]
        argv += ["--supervisor", str(os.getpid())]
        argv += ["--api-listen", api, "--device-listen", device, "--ports-file", str(ports_file)]
        for flag, value in (
            ("--console-listen", args.console_listen),
            ("--database-url", args.database_url),
            ("--log-level", args.log_level),
            ("--log-format", args.log_format),
            ("--workers", args.workers),
        ):
            if value is not None:
                argv += [flag, str(value)]
        return argv

    # Workers import `cloud` as this process did, except through the script's directory or
    # the working directory (sys.path[0], which -P leaves out): then name it.
    env = dict(os.environ)
    root = Path(cloud.__file__).resolve().parent.parent
    if root == Path(sys.path[0] or os.getcwd()).resolve():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    pool = WorkerPool(
        config.workers, command, config.api_listen, config.device_listen, args.ports_file, env
    )
    return pool.run()


async def _serve(plane: ControlPlane, ports_file: Path | None, announce: bool) -> None:
    """Serves until SIGTERM or SIGINT; `announce`: says where on stderr (a worker's supervisor
    says it for all of them)."""
    from cloud.service.gc_policy import settle_before_serving

    settle_before_serving()  # before any session: their objects are not frozen with the rest
    await plane.start()
    ports = {
        "api_port": plane.api_port,
        "device_port": plane.device_port,
        "health_port": plane.health_port,
        "metrics_port": plane.metrics_port,
        "console_port": plane.console_port,
    }
    if ports_file is not None:
        tmp = ports_file.with_name(ports_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(ports))
            tmp.replace(ports_file)
        except OSError as exc:
            await plane.stop(0)
            raise LocalStateError(f"cannot write {ports_file}: {exc.strerror}") from None
    if announce:
        print(
            f"serving api={plane.endpoints().api_address} "
            f"device={plane.endpoints().device_address}",
            file=sys.stderr,
            flush=True,
        )
    if plane.console_port:
        host = plane.config.console_listen.rpartition(":")[0]
        print(f"console on http://{host}:{plane.console_port}/", file=sys.stderr, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logging.getLogger(__name__).info("shutting down")
    await plane.stop()
