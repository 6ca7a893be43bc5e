"""`autoglm cloud signing-key ...` and `autoglm cloud ca ...`: changing what the fleet trusts,
without re-enrolling (cloud/signing_keys.py, cloud/ca_rollover.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError, LocalStateError

RESTART = "Restart the control plane (a rolling restart in Kubernetes)"


def add_parsers(cloud_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _commands(
        cloud_sub,
        "signing-key",
        "rotate the key that signs model bundles (no re-enrollment)",
        "rotate: a new key signs from now on, trusted beside the old ones through a signing "
        "root that the old key signs; retire: only the current key stays trusted. Restart the "
        "control plane afterwards (a rolling restart in Kubernetes): it hands the root to "
        "every agent when its session opens.",
        (
            ("show", "the trusted signing keys and the one that signs now"),
            ("rotate", "make a new signing key, trusted beside the current ones"),
            ("retire", "trust only the current signing key"),
        ),
        {
            "retire": "even while devices use a version only a retired key signed (they then "
            "start without it)"
        },
        cmd_signing_key,
    )
    _commands(
        cloud_sub,
        "ca",
        "change the CA that issues device certificates (no re-enrollment)",
        "rotate: a new CA is trusted beside the current one (devices take it with the "
        "signing root); activate: the new CA issues certificates and devices renew under it; "
        "retire: only the current CA stays trusted and issues the server certificate. Restart "
        "the control plane after each step.",
        (
            ("show", "the issuing CA, the trusted ones and a change under way"),
            ("rotate", "introduce a new CA, trusted beside the current one"),
            ("activate", "the introduced CA issues device certificates from now on"),
            ("retire", "trust only the issuing CA"),
        ),
        {
            "activate": "even while devices run an agent that cannot follow a CA change "
            "(they refuse the next certificate they renew)",
            "retire": "even while devices have not reported a certificate from the current CA "
            "(they are then refused)",
        },
        cmd_ca,
    )


def _commands(
    cloud_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    description: str,
    actions: tuple[tuple[str, str], ...],
    force_help: dict[str, str],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    group = cloud_sub.add_parser(name, help=text, description=description)
    actions_sub = group.add_subparsers(dest="trust_command", required=True, metavar="COMMAND")
    for action, action_help in actions:
        p = actions_sub.add_parser(action, help=action_help)
        p.add_argument("--state-dir", required=True, type=Path)
        if action in ("rotate", "retire"):
            p.add_argument(
                "--valid-for", default="365d", help="until devices refuse the new signing "
                "root if they have not taken it yet (default 365d)"
            )  # fmt: skip
        if action in force_help:
            p.add_argument("--force", action="store_true", help=force_help[action])
        p.set_defaults(handler=handler, trust_action=action)


def _valid_for(args: argparse.Namespace) -> dt.timedelta:
    from cloud.cli.output import parse_duration

    if not hasattr(args, "valid_for"):
        return dt.timedelta(0)
    try:
        return dt.timedelta(seconds=parse_duration(args.valid_for))
    except ValueError as exc:
        raise ConfigError(f"--valid-for: {exc}") from None


def _run(args: argparse.Namespace, step: Callable[[], Any], after: str) -> int:
    from cloud.cli.output import print_json

    try:
        summary = step()
    except OSError as exc:
        raise LocalStateError(f"{exc.filename or args.state_dir}: {exc.strerror}") from None
    print_json(summary.to_json())
    if args.trust_action != "show":
        print(f"{RESTART}{after}", file=sys.stderr)
    return 0


def cmd_signing_key(args: argparse.Namespace) -> int:
    from cloud.signing_keys import describe, retire, rotate

    valid_for, now, action = _valid_for(args), dt.datetime.now(dt.UTC), args.trust_action
    if action == "rotate":
        _warn_old_agents(args.state_dir)

    def step() -> Any:
        if action == "show":
            return describe(args.state_dir)
        if action == "rotate":
            return rotate(args.state_dir, valid_for, now)
        return retire(args.state_dir, valid_for, now, force=args.force)

    return _run(args, step, " so that agents get the new signing root.")


def cmd_ca(args: argparse.Namespace) -> int:
    from cloud import ca_rollover

    valid_for, now, action = _valid_for(args), dt.datetime.now(dt.UTC), args.trust_action
    if action == "rotate":
        _warn_old_agents(args.state_dir)

    def step() -> Any:
        if action == "show":
            return ca_rollover.describe(args.state_dir)
        if action == "rotate":
            return ca_rollover.rotate(args.state_dir, valid_for, now)
        if action == "activate":
            return ca_rollover.activate(args.state_dir, force=args.force)
        return ca_rollover.retire(args.state_dir, valid_for, now, force=args.force)

    bundle = args.state_dir / "ca-bundle.pem"
    return _run(args, step, f"; operators' tools: use {bundle} as --ca-cert.")


def _warn_old_agents(state_dir: Path) -> None:
    from cloud.signing_keys import devices_without_roots

    old = devices_without_roots(state_dir)
    if old:
        print(
            f"warning: {len(old)} device(s) have not reported a signing root version and "
            "cannot follow this rotation until their agent is upgraded (or until they are "
            f"heard from): {', '.join(old[:20])}{' ...' if len(old) > 20 else ''}",
            file=sys.stderr,
        )
