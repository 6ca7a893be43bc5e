"""The README's commands run as written, as far as the command line goes: every `autoglm` and
`autoglm-edge` line of its shell blocks parses with the real argument parsers (subcommands,
flags and their values exist as shown). `[...]` marks optional parts (kept), `a|b` a choice
(each is tried)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from cloud.cli.main import build_parser as autoglm_parser
from edge_agent.cli import build_parser as edge_parser

pytestmark = pytest.mark.unit
README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    lines: list[str] = []
    in_shell = False
    pending = ""
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            in_shell = raw.strip() in ("```bash", "```sh", "```shell")
            continue
        if not in_shell:
            continue
        text = pending + raw.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.startswith(("autoglm ", "autoglm-edge ")):
            lines.append(text)
    return lines


def _variants(line: str) -> list[list[str]]:
    words = shlex.split(line, comments=True)
    words = [w.strip("[]") for w in words if w not in ("...",)]
    words = [w for w in words if w]
    choices = [w.split("|") if "|" in w else [w] for w in words]
    return [list(combo) for combo in itertools.product(*choices)]


COMMANDS = _commands()


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) > 30, COMMANDS


@pytest.mark.parametrize("line", COMMANDS)
def test_a_readme_command_parses(line: str) -> None:
    for argv in _variants(line):
        parser = edge_parser() if argv[0] == "autoglm-edge" else autoglm_parser()
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"README: `{line}` does not parse as {argv}: exit {exc.code}")
    assert re.match(r"autoglm(-edge)? ", line)
