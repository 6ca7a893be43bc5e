"""Entry point of `autoglm`: parses arguments, runs one command, maps errors to exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cloud import __version__
from cloud.cli import (
    alert_cmds,
    cloud_cmds,
    data_cmds,
    demo_cmds,
    device_cmds,
    maintenance_cmds,
    model_cmds,
    operator_cmds,
    rollout_cmds,
    webhook_cmds,
)
from cloud.cli.context import (
    CliContext,
    default_context_path,
    load_contexts,
    resolve_connection,
    save_context,
    save_contexts,
)
from cloud.cli.numbers import MAX_TIMEOUT_S, decimal
from cloud.cli.output import FORMATS, set_structured_format
from cloud.client import Connection, OperatorClient
from edge_agent.errors import AutoglmError, ConfigError, InvalidInput, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm",
        description="Open-AutoGLM Edge operator CLI: devices, models, rollouts and alerts.",
    )
    parser.add_argument("--version", action="version", version=f"autoglm {__version__}")
    conn = parser.add_argument_group(
        "connection (else AUTOGLM_* variables, else the saved context)"
    )
    conn.add_argument("--server", help="control-plane API address HOST:PORT")
    conn.add_argument("--ca-cert", type=Path, help="CA certificate file of the control plane")
    conn.add_argument("--token", help="operator token")
    conn.add_argument("--tls-server-name", help="name to check in the server certificate")
    conn.add_argument(
        "--context", type=Path, help="CLI context file (default ~/.config/autoglm/context.yaml)"
    )
    conn.add_argument(
        "--context-name", help="which saved context (else AUTOGLM_CONTEXT_NAME, else the current)"
    )
    conn.add_argument(
        "--timeout",
        type=decimal(0.1, MAX_TIMEOUT_S),
        default=30.0,
        help="seconds per call (default 30)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        help="table (default), json or yaml, for every command that prints records "
        "(--json on a command is the same as -o json)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    login = sub.add_parser("login", help="save how to reach the control plane, for later commands")
    login.add_argument("--server", dest="login_server", required=True, metavar="HOST:PORT")
    login.add_argument("--ca-cert", dest="login_ca_cert", required=True, type=Path)
    login.add_argument("--token", dest="login_token", required=True)
    login.add_argument("--tls-server-name", dest="login_tls_server_name", default="")
    login.add_argument(
        "--name", dest="login_name", default="default", help="save it as this context"
    )
    login.set_defaults(handler=cmd_login)

    context = sub.add_parser("context", help="the saved contexts: one per control plane")
    csub = context.add_subparsers(dest="context_command", required=True, metavar="COMMAND")
    csub.add_parser("list", help="saved contexts; * marks the current one").set_defaults(
        handler=cmd_context_list
    )
    use = csub.add_parser("use", help="make a saved context the current one")
    use.add_argument("name")
    use.set_defaults(handler=cmd_context_use)

    completion = sub.add_parser(
        "completion",
        help='print a shell completion script: eval "$(autoglm completion bash)"',
    )
    completion.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    completion.set_defaults(handler=cmd_completion)

    cloud_cmds.add_parsers(sub)
    device_cmds.add_parsers(sub)
    model_cmds.add_parsers(sub)
    rollout_cmds.add_parsers(sub)
    alert_cmds.add_parsers(sub)
    webhook_cmds.add_parsers(sub)
    maintenance_cmds.add_parsers(sub)
    operator_cmds.add_parsers(sub)
    demo_cmds.add_parsers(sub)
    data_cmds.add_parsers(sub)
    return parser


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab  # only here: no start-up cost for other commands

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _context_path(args: argparse.Namespace) -> Path:
    return Path(args.context) if args.context else default_context_path(os.environ)


def cmd_context_list(args: argparse.Namespace) -> int:
    file = load_contexts(_context_path(args))
    for name, saved in sorted(file.contexts.items()):
        print(f"{'*' if name == file.current else ' '} {name:20s} {saved.server}")
    if not file.contexts:
        print("no saved context: run `autoglm login --server ... --name NAME`")
    return 0


def cmd_context_use(args: argparse.Namespace) -> int:
    path = _context_path(args)
    file = load_contexts(path)
    if args.name not in file.contexts:
        known = ", ".join(sorted(file.contexts)) or "none"
        raise ConfigError(f"no context named {args.name!r} in {path} (known: {known})")
    file.current = args.name
    save_contexts(path, file)
    print(f"using context {args.name!r} ({file.contexts[args.name].server})")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    if not args.login_ca_cert.is_file():
        raise ConfigError(f"--ca-cert {args.login_ca_cert}: no such file")
    path = Path(args.context) if args.context else default_context_path(os.environ)
    context = CliContext(
        server=args.login_server,
        ca_cert=str(args.login_ca_cert.absolute()),
        token=args.login_token,
        tls_server_name=args.login_tls_server_name,
    )
    connection = Connection(
        server=context.server,
        ca_pem=args.login_ca_cert.read_bytes(),
        token=context.token,
        tls_server_name=context.tls_server_name,
        timeout_s=args.timeout,
    )
    with OperatorClient(connection) as client:
        count = len(client.list_devices())  # proves address, CA and token before saving
    save_context(path, context, args.login_name)
    print(
        f"logged in to {args.login_server} ({count} devices); saved as context "
        f"{args.login_name!r} in {path}"
    )
    return 0


def _surrogate(text: str) -> int | None:
    """Where `text` holds bytes that were not UTF-8 (Python hands them over as lone
    surrogates), or None."""
    return next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)


def _text_argument(argv: Sequence[str], args: argparse.Namespace) -> None:
    """InvalidInput naming the first argument that is not UTF-8 text and was parsed as text
    (no request, file or log line can carry it). Paths are exempt: a file's name may be any
    bytes, and the command opens it as given. The value itself is not repeated: it may be a
    token."""
    texts: set[str] = set()
    for value in vars(args).values():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str) and _surrogate(item) is not None:
                texts.add(item)
    for index, arg in enumerate(argv):
        flag = arg.partition("=")[0] if arg.startswith("--") and "=" in arg else ""
        value = arg.partition("=")[2] if flag else arg
        bad = _surrogate(value)
        if bad is None or value not in texts:
            continue  # text, or a path
        if not flag and index and argv[index - 1].startswith("-"):
            flag = argv[index - 1]
        clean = flag and _surrogate(flag) is None
        what = f"the value of {flag}" if clean else f"argument {index + 1}"
        code = ord(value[bad])
        found = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"U+{code:04X}"
        at = bad + 1 + (len(arg) - len(value))
        raise InvalidInput(
            f"{what} is not UTF-8 text ({found} at character {at}); "
            "pass it in UTF-8 (check the terminal's or script's encoding)"
        )


def run(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _text_argument(argv, args)
    except InvalidInput as exc:
        return report("autoglm", exc)
    if args.output in ("json", "yaml"):
        if not hasattr(args, "json"):
            parser.error(f"-o {args.output}: this command prints no records; drop -o")
        args.json = True
    set_structured_format("yaml" if args.output == "yaml" else "json")
    try:
        needs_client = getattr(args, "needs_client", False)
        if callable(needs_client):  # some commands talk to the control plane only sometimes
            needs_client = needs_client(args)
        if needs_client:
            flags = {
                "server": args.server,
                "ca_cert": str(args.ca_cert) if args.ca_cert else None,
                "token": args.token,
                "tls_server_name": args.tls_server_name,
                "context": str(args.context) if args.context else None,
                "context_name": args.context_name,
            }
            connection = resolve_connection(flags, os.environ, args.timeout)
            with OperatorClient(connection) as client:
                return int(args.handler(args, client))
        return int(args.handler(args))
    except AutoglmError as exc:
        return report("autoglm", exc)
    except KeyboardInterrupt:
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":  # how `cloud serve --workers N` starts its workers
    main()
