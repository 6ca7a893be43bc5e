"""`autoglm model ...` and `autoglm rollout ...` as an operator types them (separate
processes) against a real control plane; bad arguments are clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import register
from tests.support.agents import enroll_identity, wait_for
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.test_cli_e2e import autoglm

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[RunningPlane]:
    cloud = tmp_path / "cloud"
    running = start_plane(cloud, init_plane(cloud).operator_token, rollout_interval_s=0.2)
    autoglm(
        tmp_path,
        "login",
        "--server",
        running.api_address,
        "--ca-cert",
        str(cloud / "ca.crt"),
        "--token",
        running.token,
    )
    yield running
    running.stop()


def test_push_list_show_and_a_rollout_from_the_cli(
    plane: RunningPlane, tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    key = plane.plane.secrets.signing_key
    v1 = make_version(trained, tmp_path / "v1", "1", key)
    v2 = make_version((v1, key), tmp_path / "v2", "2", key)
    for name in ("pump-a", "pump-b"):  # enrolled, never online: their installs wait
        enroll_identity(register(plane, name, site="a"), tmp_path / name)

    pushed = autoglm(tmp_path, "model", "push", str(v1), "--json")
    assert json.loads(pushed.stdout)["version"] == "1"
    autoglm(tmp_path, "model", "push", str(v2))
    listing = json.loads(autoglm(tmp_path, "model", "list", "--json").stdout)
    assert [m["version"] for m in listing] == ["1", "2"]
    shown = autoglm(tmp_path, "model", "show", "pump:2").stdout
    assert "fp32" in shown and "pump" in shown

    created = autoglm(
        tmp_path,
        "rollout", "create", "pump:2", "--selector", "site=a", "--waves", "1,100%",
        "--soak", "0", "--json",
    )  # fmt: skip
    rollout = json.loads(created.stdout)
    assert [w["target_devices"] for w in rollout["waves"]] == [1, 1], rollout
    wait_for(
        lambda: (
            json.loads(autoglm(tmp_path, "rollout", "status", rollout["id"], "--json").stdout)[
                "state"
            ]
            == "succeeded"
        ),
        timeout=30,
        interval=0.3,
    )
    table = autoglm(tmp_path, "rollout", "status", rollout["id"]).stdout
    assert "pump-a" in table and "deferred" in table, table
    assert rollout["id"] in autoglm(tmp_path, "rollout", "list").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "push", "/nonexistent/bundle"], "no such bundle"),
        (["model", "push", "/tmp"], "not a bundle (manifest.json"),
        (["model", "show", "pump"], "NAME:VERSION"),
        (["model", "show", "pump:9"], "not found"),
        (["rollout", "create", "pump:9", "--soak", "0"], "not found"),
        (["rollout", "create", "pump:1", "--waves", "50%,10%", "--soak", "0"], "wave"),
        (["rollout", "create", "pump:1", "--soak", "ten minutes"], "soak"),
        (["rollout", "create", "pump:1", "--max-failures", "150%"], "max"),
        (["rollout", "status", "no-such-id"], "rollout"),
    ],
)
def test_bad_arguments_are_clear_errors(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    args: list[str],
    message: str,
) -> None:
    key = plane.plane.secrets.signing_key
    with plane.client() as client:
        client.push_bundle(make_version(trained, tmp_path / "v1", "1", key))
    enroll_identity(register(plane, "pump-a", site="a"), tmp_path / "pump-a")
    result = autoglm(tmp_path, *args, check=False)
    assert result.returncode != 0
    assert message.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr
