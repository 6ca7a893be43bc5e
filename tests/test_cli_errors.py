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
