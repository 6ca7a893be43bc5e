"""Device image recipes: pinned bases only, a systemd unit that runs the agent, and signed
OTA manifests built from the device profiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.profiles import DEFAULT_DIR, load_profiles

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "firmware_images/ota/build_manifest.py"
DIGEST = "sha256:" + "ab" * 32


def test_the_agent_recipe_builds_only_on_a_pinned_base() -> None:
    dockerfile = (ROOT / "firmware_images/agent/Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert froms == ["${BASE_IMAGE}"]  # no other stage, nothing floating
    assert re.search(r"^ARG BASE_IMAGE$", dockerfile, re.MULTILINE)  # and no default
    assert ":latest" not in dockerfile
    for profile in load_profiles(DEFAULT_DIR).values():  # what BASE_IMAGE may be
        assert not profile.agent_base_image.endswith(":latest")
    assert "torch" not in dockerfile.replace("no torch", "")  # the device stays light


def test_the_systemd_unit_runs_the_agent_with_its_config() -> None:
    unit = (ROOT / "firmware_images/agent/autoglm-edge.service").read_text()
    assert (
        "ExecStart=/opt/autoglm/bin/autoglm-edge run --config /etc/autoglm-edge/agent.yaml" in unit
    )
    assert "Restart=always" in unit and "User=autoglm" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_an_ota_manifest_is_built_and_signed(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "signing.key").write_bytes(pem)
    image = f"registry.example/autoglm-edge@{DIGEST}"
    result = _run(
        "--profile", "jetson-orin-nano", "--image", image, "--version", "0.1.0",
        "--signing-key", str(tmp_path / "signing.key"), "--out", str(tmp_path / "ota"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = (tmp_path / "ota/ota-manifest.json").read_bytes()
    key.public_key().verify((tmp_path / "ota/ota-manifest.sig").read_bytes(), body)
    manifest = json.loads(body)
    assert manifest["format"] == "autoglm-ota/1" and manifest["jetpack"] == "6.1"
    assert manifest["image"]["reference"] == image
    assert manifest["host_files"][0]["path"] == "etc/systemd/system/autoglm-edge.service"
    base = _run("--base-image", "jetson-xavier-nx")
    assert base.stdout.strip() == load_profiles(DEFAULT_DIR)["jetson-xavier-nx"].agent_base_image


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--profile", "jetson-tx1", "--image", f"r.io/a@{DIGEST}", "--version", "1.0.0"],
            "not a device profile",
        ),
        (
            ["--profile", "jetson-orin-nx", "--image", "r.io/a:1.0", "--version", "1.0.0"],
            "pinned by digest",
        ),
        (
            ["--profile", "jetson-orin-nx", "--image", f"r.io/a@{DIGEST}", "--version", "one"],
            "not a version",
        ),
        (["--profile", "jetson-orin-nx"], "missing --image"),
    ],
)
def test_bad_ota_arguments_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run(*args, "--out", str(tmp_path / "ota"), "--signing-key", str(tmp_path / "k"))
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ota").exists()
