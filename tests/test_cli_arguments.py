"""Command-line arguments out of range or not UTF-8: a usage error naming the flag, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud.cli.main import run as autoglm
from tests.support.cloud import RunningPlane
from tests.test_cli_errors import _isolated_home

pytestmark = pytest.mark.integration

__all__ = ["_isolated_home"]  # the autouse fixture: HOME and AUTOGLM_* kept out of each test


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["alerts", "list", "--since", "1000000d"], "--since"),
        (["audit", "list", "--since", "1000000d"], "--since"),
        (["data", "export", "--since", "1000000d", "--out", "x"], "--since"),
        (
            ["maintenance", "add", "--selector", "a=b", "--reason", "r", "--from", "3000000d"],
            "--from",
        ),
        (["maintenance", "add", "--selector", "a=b", "--reason", "r", "--to", "3000000d"], "--to"),
        (["rollout", "create", "m:1", "--soak", "100000d"], "--soak"),
        (["device", "token", "p1", "--token-ttl", "100000d"], "--token-ttl"),
        (["device", "register", "p2", "--token-ttl", "100000d"], "--token-ttl"),
        (["device", "group", "create", "g", "--uses", "2", "--expires", "100000d"], "--expires"),
        (["webhook", "rotate-secret", "w1", "--overlap", "1e30d"], "--overlap"),
        (["alerts", "shelve", "a1", "--for", "1e30d", "--reason", "r"], "--for"),
    ],
)
def test_a_duration_past_the_range_is_named_not_a_traceback(
    plane: RunningPlane, capsys: pytest.CaptureFixture[str], command: list[str], flag: str
) -> None:
    conn = ["--server", plane.api_address, "--ca-cert", str(plane.config.state_dir / "ca.crt")]
    assert autoglm([*conn, "--token", plane.token, *command]) == 2
    err = capsys.readouterr().err
    assert flag in err and "at most" in err and "Traceback" not in err


def test_a_trust_validity_past_the_range_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("signing-key", "ca"):
        args = ["cloud", kind, "rotate", "--state-dir", str(tmp_path), "--valid-for", "1e30d"]
        assert autoglm(args) == 2
        err = capsys.readouterr().err
        assert "--valid-for" in err and "at most" in err


BIG = "99999999999999"
OUT_OF_RANGE = [
    (["alerts", "list", "--limit", BIG], "--limit"),
    (["alerts", "list", "--limit", "0"], "--limit"),
    (["device", "predictions", "x", "--limit", BIG], "--limit"),
    (["audit", "list", "--limit", "99999999999"], "--limit"),
    (
        ["data", "export", "--since", "1d", "--out", "x", "--page-size", "99999999999"],
        "--page-size",
    ),
    (["data", "export", "--since", "1d", "--out", "x", "--page-size", "-3"], "--page-size"),
    (["rollout", "create", "m:1", "--min-shadow-windows", BIG], "--min-shadow-windows"),
    (["rollout", "create", "m:1", "--min-agreement", "nan"], "--min-agreement"),
    (["rollout", "create", "m:1", "--min-agreement", "1.5"], "--min-agreement"),
    (["rollout", "create", "m:1", "--max-alert-rate-diff", "inf"], "--max-alert-rate-diff"),
    (["rollout", "create", "m:1", "--max-latency-ratio", "-1"], "--max-latency-ratio"),
    (["rollout", "status", "r", "--watch", "--interval", "nan"], "--interval"),
    (["rollout", "status", "r", "--watch", "--interval", "-1"], "--interval"),
    (["--timeout", "nan", "device", "list"], "--timeout"),
    (["--timeout", "-1", "device", "list"], "--timeout"),
    (["--timeout", "1e300", "device", "list"], "--timeout"),
    (["device", "group", "create", "g", "--uses", BIG], "--uses"),
    (["cloud", "serve", "--state-dir", "x", "--workers", BIG], "--workers"),
    (["demo", "--duration", "nan"], "--duration"),
    (["demo", "--epochs", BIG], "--epochs"),
    (["model", "train", "--out", "x", "--hidden", BIG], "--hidden"),
    (["model", "train", "--out", "x", "--seed", "-1"], "--seed"),
    (["model", "train", "--out", "x", "--period", "nan"], "--period"),
    (["model", "train", "--out", "x", "--target-far", "inf"], "--target-far"),
    (["model", "train", "--out", "x", "--learning-rate", "0"], "--learning-rate"),
    (["model", "train", "--out", "x", "--job-timeout", "nan"], "--job-timeout"),
    (["model", "train", "--out", "x", "--gpus", BIG], "--gpus"),
    (
        [
            "model",
            "quantize",
            "b",
            "--precision",
            "int8",
            "--calibration-data",
            "d",
            "--max-drop",
            "nan",
        ],
        "--max-drop",
    ),
    (["model", "evaluate", "b", "--data", "d", "--calibration-rows", BIG], "--calibration-rows"),
    (
        [
            "model",
            "train-local",
            "--from-export",
            "e",
            "--base",
            "b",
            "--out",
            "u",
            "--batch-size",
            "0",
        ],
        "--batch-size",
    ),
]


@pytest.mark.parametrize(("argv", "flag"), OUT_OF_RANGE)
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        autoglm(["--server", "127.0.0.1:1", "--token", "agt_op_x", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and "Traceback" not in err, err[-300:]
    assert "must be" in err or "is not a" in err, err[-300:]


def test_every_numeric_flag_has_a_bounded_type() -> None:
    """No `type=int` or `type=float` left: each takes a whole() or decimal() with its bounds."""
    import argparse

    from cloud.cli.main import build_parser

    def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    found += parsers(child)
        return found

    plain = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in parsers(build_parser())
        for a in p._actions
        if a.type in (int, float)
    ]
    assert plain == []


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["device", "show", "a\udcff"], "argument 3 is not UTF-8 text (byte 0xff at character 2)"),
        (["--token", "agt_op_\udcfe", "device", "list"], "the value of --token is not UTF-8"),
        (["device", "list", "--selector=\udcc0x"], "the value of --selector is not UTF-8"),
    ],
)
def test_an_argument_that_is_not_utf8_is_named(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    assert autoglm(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert "agt_op_" not in err  # a token's value is not repeated


def test_a_path_that_is_not_utf8_is_opened_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file's name may be any bytes: a Path argument naming one is passed on as it is
    (it used to be refused as "not UTF-8 text" before it was parsed); text sent on, like
    --variant, is still refused."""
    odd = tmp_path / b"caf\xe9".decode("utf-8", "surrogateescape")
    odd.mkdir()
    verify = ["model", "verify", str(odd), "--public-key", str(odd / "key.pub")]
    # Through the real entry point: its stderr writes the path's bytes as \x escapes.
    result = subprocess.run(
        [sys.executable, "-m", "cloud.cli.main", *verify], capture_output=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-500:]
    assert b"not UTF-8" not in result.stderr, result.stderr[-500:]
    assert b"caf\\udce9/key.pub: No such file" in result.stderr, result.stderr[-500:]
    assert b"Traceback" not in result.stderr, result.stderr[-500:]
    argv = ["model", "evaluate", str(odd), "--data", str(odd), "--calibration-rows", "1"]
    assert autoglm([*argv, "--variant", "fp\udcff"]) == 2
    err = capsys.readouterr().err
    assert "the value of --variant is not UTF-8 text (byte 0xff at character 3)" in err, err


@pytest.mark.parametrize("flag", ["--ca-cert", "--context"])
def test_a_connection_file_that_is_not_utf8_is_opened_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """--ca-cert and --context name files too: refused as missing, not as "not UTF-8"."""
    odd = str(tmp_path / b"caf\xe9".decode("utf-8", "surrogateescape"))
    argv = ["--server", "127.0.0.1:1", "--token", "agt_op_x", flag, odd, "device", "list"]
    assert autoglm(argv) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" not in err and "Traceback" not in err, err
    if flag == "--ca-cert":  # a context file that is not there is no context: nothing named
        assert "caf\\udce9: No such file" in err, err


def test_a_non_utf8_argument_through_the_real_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloud.cli.main", "device", "show", b"edge-\xff".decode(
            "utf-8", "surrogateescape"
        )],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-500:]
    assert b"argument 3 is not UTF-8 text (byte 0xff at character 6)" in result.stderr
    assert b"Traceback" not in result.stderr
