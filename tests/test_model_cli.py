"""`autoglm model ...` through its real entry point: the full flow, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.cli.main import run as autoglm
from cloud.pki import private_key_pem, public_key_pem
from tests.support.sensordata import write_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = ["--window", "24", "--hidden", "16", "--epochs", "3", "--calibration-rows", "120"]


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = tmp_path / "signing.key", tmp_path / "signing.pub"
    private.write_bytes(private_key_pem(key))
    public.write_bytes(public_key_pem(key))
    for name in ("AUTOGLM_SIGNING_KEY", "AUTOGLM_SIGNING_PUB"):
        monkeypatch.delenv(name, raising=False)
    return private, public


def test_train_evaluate_predict_quantize_verify(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    data = write_dataset(tmp_path / "data")
    bundle = tmp_path / "bundle"
    base = ["model", "train", "--data", str(data), "--out", str(bundle)]
    assert autoglm([*base, "--signing-key", str(private), "--no-progress", *SMALL]) == 0
    capsys.readouterr()
    assert (
        autoglm(
            [
                "model",
                "evaluate",
                str(bundle),
                "--public-key",
                str(public),
                "--data",
                str(data / "faults"),
                "--calibration-rows",
                "120",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["files"]) == 6 and 0 <= report["total"]["f1"] <= 1
    out = tmp_path / "pred"
    assert (
        autoglm(
            [
                "model",
                "predict",
                str(bundle),
                "--public-key",
                str(public),
                "--data",
                str(data),
                "--calibration-rows",
                "120",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.csv")) == [
        *(f"faults/{i}.csv" for i in range(6)),
        "normal.csv",
    ]
    assert (
        autoglm(
            [
                "model",
                "quantize",
                str(bundle),
                "--precision",
                "fp16",
                "--calibration-data",
                str(data / "faults"),
                "--calibration-rows",
                "120",
                "--max-drop",
                "0.05",
                "--signing-key",
                str(private),
            ]
        )
        == 0
    )
    assert (
        autoglm(
            [
                "model",
                "export",
                str(bundle),
                "--signing-key",
                str(private),
                "--tar",
                str(tmp_path / "b.tar"),
            ]
        )
        == 0
    )
    assert autoglm(["model", "verify", str(tmp_path / "b.tar"), "--public-key", str(public)]) == 0
    assert "fp16: golden difference" in capsys.readouterr().out


def test_training_on_a_bad_csv_names_file_and_line(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_dataset(tmp_path / "data")
    bad = data / "faults" / "3.csv"
    lines = bad.read_text().splitlines()
    lines[7] = lines[7].replace(";", ";oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    code = autoglm(
        [
            "model",
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "b"),
            "--signing-key",
            str(keys[0]),
            *SMALL,
        ]
    )
    assert code == 2
    assert f"{bad}:8: column 'flow'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_without_a_signing_key_nothing_is_trained(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = autoglm(["model", "train", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    assert code == 2
    assert "no signing key" in capsys.readouterr().err


def test_verify_refuses_a_bundle_from_another_key_and_build_engines_explains(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, _ = keys
    data = write_dataset(tmp_path / "data", experiments=2, normal=1)
    bundle = tmp_path / "bundle"
    assert (
        autoglm(
            [
                "model",
                "train",
                "--data",
                str(data),
                "--out",
                str(bundle),
                "--signing-key",
                str(private),
                "--no-progress",
                *SMALL,
            ]
        )
        == 0
    )
    other = tmp_path / "other.pub"
    other.write_bytes(public_key_pem(ed25519.Ed25519PrivateKey.generate()))
    assert autoglm(["model", "verify", str(bundle), "--public-key", str(other)]) == 10
    assert "signature does not verify" in capsys.readouterr().err
    before = (bundle / "manifest.json").read_bytes()
    code = autoglm(
        [
            "model",
            "build-engines",
            str(bundle),
            "--profile",
            "jetson-orin-nx",
            "--signing-key",
            str(private),
        ]
    )
    assert code == 7
    assert "TensorRT is not available here" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_bytes() == before
    assert json.loads(before)["engines"]["status"] == "build-on-device"
