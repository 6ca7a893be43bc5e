"""Bad input at the command line: a clear message, a non-zero exit code, nothing half-written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.cli.main import run as autoglm
from edge_agent.cli import run as autoglm_edge
from tests.conftest import register
from tests.support.cloud import RunningPlane, init_plane

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("AUTOGLM_SERVER", "AUTOGLM_TOKEN", "AUTOGLM_CA_CERT", "AUTOGLM_CONTEXT"):
        monkeypatch.delenv(name, raising=False)


def test_init_refuses_a_non_empty_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "cloud"
    init_plane(state)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    code = autoglm(["cloud", "init", "--state-dir", str(state), "--host", "localhost"])
    assert code == 7
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before


def test_init_with_bad_listen_address_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = autoglm(
        [
            "cloud",
            "init",
            "--state-dir",
            str(tmp_path / "c"),
            "--host",
            "h",
            "--api-listen",
            "nonsense",
        ]
    )
    assert code == 2
    assert "api_listen" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_init_with_unreachable_database_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = autoglm(
        [
            "cloud",
            "init",
            "--state-dir",
            str(tmp_path / "c"),
            "--host",
            "h",
            "--database-url",
            "postgresql://nobody@127.0.0.1:1/none",
        ]
    )
    assert code == 8
    assert "cannot open the database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_serve_with_unknown_config_key_names_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "cloud"
    init_plane(state)
    with (state / "cloud.yaml").open("a") as f:
        f.write("heartbeat_intervall_s: 3\n")
    assert autoglm(["cloud", "serve", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "heartbeat_intervall_s" in err and "cloud.yaml" in err


def test_several_workers_on_sqlite_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "cloud"
    init_plane(state)
    assert autoglm(["cloud", "serve", "--state-dir", str(state), "--workers", "3"]) == 2
    err = capsys.readouterr().err
    assert "workers = 3 needs a PostgreSQL database_url" in err, err


def test_workers_whose_moved_up_ports_collide_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Worker k serves health and metrics on the configured port + k: with 3 workers a
    health port one below the metrics port lands on it. Refused before anything starts
    (the database named is never reached)."""
    state = tmp_path / "cloud"
    init_plane(state)
    with (state / "cloud.yaml").open("a") as f:
        f.write('health_listen: "127.0.0.1:19464"\nmetrics_listen: "127.0.0.1:19465"\n')
    argv = ["cloud", "serve", "--state-dir", str(state), "--workers", "3"]
    assert autoglm([*argv, "--database-url", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "metrics_listen 127.0.0.1:19465 is port 19465, also health_listen of worker 1" in err
    with pytest.raises(SystemExit) as exit_info:
        autoglm([*argv, "--workers", "0"])
    assert exit_info.value.code == 2
    assert "argument --workers: must be from 1 to 64" in capsys.readouterr().err


def test_workers_refuse_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Workers bind with SO_REUSEPORT, so the supervisor checks first that nothing listens
    there (the database named is never reached)."""
    state = tmp_path / "cloud"
    init_plane(state)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = autoglm(
            ["cloud", "serve", "--state-dir", str(state), "--workers", "2",
             "--database-url", "postgresql://nobody@127.0.0.1:1/none",
             "--device-listen", f"127.0.0.1:{port}"]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and f"cannot listen on 127.0.0.1:{port}" in err, err


def test_a_port_left_in_time_wait_is_free_for_workers() -> None:
    """The server side closed first: its end of the connection waits out TIME_WAIT, and a
    plane started again on the port must not take that for another program listening."""
    from cloud.service.workers import check_free

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()
    assert client.recv(1) == b""  # its FIN arrived
    client.close()
    listener.close()
    check_free(f"127.0.0.1:{port}")


def test_serve_without_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert autoglm(["cloud", "serve", "--state-dir", str(tmp_path)]) == 2
    assert "autoglm cloud init" in capsys.readouterr().err


def test_commands_without_a_connection_say_how_to_get_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert autoglm(["device", "list"]) == 2
    assert "autoglm login" in capsys.readouterr().err


def test_unreachable_control_plane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "cloud"
    init_plane(state)
    code = autoglm(
        [
            "--server",
            "127.0.0.1:1",
            "--ca-cert",
            str(state / "ca.crt"),
            "--token",
            "agt_op_x",
            "--timeout",
            "3",
            "device",
            "list",
        ]
    )
    assert code == 8
    assert "cannot reach 127.0.0.1:1" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        autoglm(["device", "frobnicate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        autoglm_edge(["enroll"])
    assert exit_info.value.code == 2


def test_operator_commands_map_errors_to_exit_codes(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--server", plane.api_address, "--ca-cert", str(plane.config.state_dir / "ca.crt")]
    ok = [*conn, "--token", plane.token]
    assert autoglm([*ok, "device", "register", "p1", "--label", "broken"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert autoglm([*ok, "device", "register", "p1", "--token-ttl", "soon"]) == 2
    assert "--token-ttl" in capsys.readouterr().err
    assert autoglm([*ok, "device", "register", "p1"]) == 0
    assert "shown once" in capsys.readouterr().out
    assert autoglm([*ok, "device", "register", "p1"]) == 4
    assert autoglm([*ok, "device", "show", "ghost"]) == 3
    assert autoglm([*conn, "--token", "agt_op_bogus", "device", "list"]) == 5
    assert "not authenticated" in capsys.readouterr().err
    assert autoglm([*ok, "device", "label", "p1"]) == 2
    assert autoglm([*ok, "device", "label", "p1", "line=4", "--remove", "nothing"]) == 0
    assert "line=4" in capsys.readouterr().out
    assert autoglm([*ok, "device", "show", "p1", "--json"]) == 0
    assert '"name": "p1"' in capsys.readouterr().out
    boot = tmp_path / "p1.yaml"
    assert autoglm([*ok, "device", "token", "p1", "--bootstrap-out", str(boot)]) == 0
    assert "New enrollment token for p1" in capsys.readouterr().out and boot.exists()
    assert autoglm([*ok, "device", "token", "ghost"]) == 3


def test_login_checks_before_saving(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = tmp_path / "ctx.yaml"
    ca = str(plane.config.state_dir / "ca.crt")
    assert (
        autoglm(
            [
                "--context",
                str(ctx),
                "login",
                "--server",
                plane.api_address,
                "--ca-cert",
                ca,
                "--token",
                "agt_op_wrong",
            ]
        )
        == 5
    )
    assert not ctx.exists()
    assert (
        autoglm(
            [
                "--context",
                str(ctx),
                "login",
                "--server",
                plane.api_address,
                "--ca-cert",
                ca,
                "--token",
                plane.token,
            ]
        )
        == 0
    )
    assert oct(ctx.stat().st_mode & 0o777) == "0o600"
    assert autoglm(["--context", str(ctx), "device", "list"]) == 0
    assert "no devices registered yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not: [valid", "not valid YAML"),
        ("- a list\n", "mapping"),
        ("kind: autoglm-bootstrap\nversion: 1\n", "missing key 'api_address'"),
        (
            "device_id: x\ndevice_name: y\napi_address: h:1\ndevice_address: h:2\n"
            "ca_certificate: nope\ntoken: agt_enr_12345678\nexpires_at: 2030-01-01T00:00:00Z\n",
            "ca_certificate",
        ),
    ],
)
def test_malformed_bootstrap_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "boot.yaml"
    path.write_text(content)
    assert (
        autoglm_edge(["enroll", "--bootstrap", str(path), "--state-dir", str(tmp_path / "s")]) == 2
    )
    err = capsys.readouterr().err
    assert expected in err and str(path) in err
    assert not (tmp_path / "s").exists()


def test_enroll_into_unwritable_state_dir(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.bootstrap import write_bootstrap

    path = tmp_path / "boot.yaml"
    write_bootstrap(path, register(plane, "pump-1"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        autoglm_edge(["enroll", "--bootstrap", str(path), "--state-dir", str(blocker / "s")]) == 9
    )
    assert "not writable" in capsys.readouterr().err
    assert (
        autoglm_edge(["enroll", "--bootstrap", str(path), "--state-dir", str(tmp_path / "s")]) == 0
    )


def test_run_with_garbage_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("state_dir: /x\nreconnect: {max_s: -1, bogus: 1}\n")
    assert autoglm_edge(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "reconnect.bogus" in err and str(config) in err
    assert autoglm_edge(["run", "--state-dir", str(tmp_path)]) == 7
    assert "no enrolled identity" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: [1, 2]\n", "keys: server"),
        ("colour: red\n", "keys: colour"),
        ("- a\n- b\n", "must be a mapping"),
        ("server: 'x\n", "not valid YAML"),
    ],
)
def test_a_bad_cli_context_file_is_named_with_its_bad_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    context = tmp_path / "context.yaml"
    context.write_text(text)
    assert autoglm(["--context", str(context), "device", "list"]) == 2
    err = capsys.readouterr().err
    assert str(context) in err and message in err, err


def test_operator_commands_load_no_server_store_or_model_code() -> None:
    """`autoglm --help` and every operator command start without the control plane's server,
    store, the model pipeline, torch, numpy or pydantic (tests/benchmarks/bench_cli_startup.py
    measures the time)."""
    heavy = (
        "cloud.service.server",
        "cloud.store",
        "cloud.model.pipeline",
        "cloud.model.train",
        "torch",
        "onnxruntime",
        "sqlalchemy",
        "numpy",
        "pydantic",
    )
    probe = (
        "import sys, cloud.cli.main as m; m.build_parser(); "
        f"print([n for n in sys.modules if n.startswith({heavy!r})])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


def test_output_formats_apply_only_to_commands_that_print_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        autoglm(["-o", "yaml", "cloud", "init", "--state-dir", str(tmp_path / "c"), "--host", "x"])
    assert exited.value.code == 2
    assert "prints no records" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_completion_knows_the_command_groups(
    shell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert autoglm(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("device", "rollout", "alerts", "webhook", "--output"):
        assert word in script, word


def test_a_ca_file_that_is_not_a_certificate_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("hello")
    code = autoglm(["--server", "localhost:1", "--ca-cert", str(bad), "--token", "t", "device",
                    "list"])  # fmt: skip
    assert code == 2
    assert "is not a PEM certificate" in capsys.readouterr().err


def test_the_device_port_and_a_wrong_name_are_named_as_such(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(plane.ca_pem)
    base = ["--ca-cert", str(ca), "--token", plane.token, "--timeout", "10"]
    assert autoglm(["--server", plane.device_address, *base, "device", "list"]) == 8
    assert "needs a client certificate" in capsys.readouterr().err
    # The certificate names localhost and 127.0.0.1, not the name checked here.
    name = ["--tls-server-name", "pump-hall.example"]
    assert autoglm(["--server", plane.api_address, *name, *base, "device", "list"]) == 8
    assert "does not name the address" in capsys.readouterr().err


def test_several_contexts_one_current_and_a_choice_per_command(
    plane: RunningPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(plane.ca_pem)
    path = tmp_path / "contexts.yaml"
    login = ["--context", str(path), "login", "--server", plane.api_address, "--ca-cert",
             str(ca), "--token", plane.token]  # fmt: skip
    assert autoglm([*login, "--name", "plant-a"]) == 0
    assert autoglm([*login, "--name", "plant-b"]) == 0
    capsys.readouterr()
    assert autoglm(["--context", str(path), "context", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["plant-a", "*"], listed
    assert autoglm(["--context", str(path), "context", "use", "plant-a"]) == 0
    capsys.readouterr()
    assert autoglm(["--context", str(path), "context", "list"]) == 0
    assert "* plant-a" in capsys.readouterr().out
    assert autoglm(["--context", str(path), "--context-name", "plant-b", "device", "list"]) == 0
    capsys.readouterr()
    assert autoglm(["--context", str(path), "--context-name", "plant-c", "device", "list"]) == 2
    err = capsys.readouterr().err
    assert "no context named 'plant-c'" in err and "plant-a, plant-b" in err, err


def test_login_repairs_a_context_file_it_cannot_read(tmp_path: Path) -> None:
    from cloud.cli.context import CliContext, load_context, save_context

    path = tmp_path / "context.yaml"
    path.write_text("- not\n- a mapping\n")
    save_context(path, CliContext(server="cp:7443", ca_cert="/ca.crt", token="t"), "plant-a")
    assert load_context(path).server == "cp:7443"
    assert (tmp_path / "context.yaml.bad").read_text().startswith("- not")


def test_a_context_file_of_one_flat_context_still_reads(tmp_path: Path) -> None:
    from cloud.cli.context import load_context

    path = tmp_path / "context.yaml"
    path.write_text("server: cp:7443\nca_cert: /ca.crt\ntoken: t\n")
    assert load_context(path).server == "cp:7443"


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
