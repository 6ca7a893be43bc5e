"""Train -> export -> quantize -> verify -> predict on a small generated data set, for real."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

import cloud.model.quantize as quantize_module
from cloud.model.backtest import evaluate, load_model, predict
from cloud.model.bundle_writer import pack
from cloud.model.export import export_onnx
from cloud.model.net import NetConfig, SensorGraphNet
from cloud.model.pipeline import CHECKPOINT, FP32_ONNX, reexport, train_bundle
from cloud.model.quantize import quantize_bundle
from edge_agent.bundle import MANIFEST, read_signed_manifest, unpack_tar, verify_bundle
from edge_agent.errors import FailedPrecondition, IntegrityError
from edge_agent.selftest import run_self_test
from tests.support.bundles import small_options
from tests.support.sensordata import write_dataset, write_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OPTIONS = small_options("pump-test", epochs=6, seed=3)


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, data: Path, key: ed25519.Ed25519PrivateKey
) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "b"
    train_bundle([data], out, OPTIONS, key, log=lambda _: None)
    return out


@pytest.fixture
def bundle(trained: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the trained bundle, free to change."""
    copy = tmp_path / "bundle"
    shutil.copytree(trained, copy)
    yield copy


def test_training_converges_and_detects_faults(trained: Path, data: Path, key) -> None:
    manifest = verify_bundle(trained, key.public_key())
    losses = manifest.training["losses"]
    # Site-normalised windows put each sensor's own noise at 1: the forecast loss falls to
    # that floor, not towards 0 (6 epochs on 7 small files).
    assert isinstance(losses, list) and losses[-1] < 0.9 * losses[0], losses
    assert manifest.export["parity_max_abs_diff"] < 1e-4
    fresh = data.parent / "fresh"
    for i in range(2):
        write_experiment(fresh / f"{i}.csv", seed=50 + i)
    with load_model(trained, key.public_key()) as loaded:
        _, total = evaluate(loaded, fresh, calibration_rows=120)
    assert total.f1 > 0.8, total.summary()
    assert total.far < 0.15, total.summary()


def test_training_is_reproducible_with_a_seed(
    trained: Path, data: Path, key, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    train_bundle([data], again, OPTIONS, key, log=lambda _: None)
    first = torch.load(trained / CHECKPOINT, weights_only=True)["state"]
    second = torch.load(again / CHECKPOINT, weights_only=True)["state"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (
        verify_bundle(again, key.public_key()).training["losses"]
        == verify_bundle(trained, key.public_key()).training["losses"]
    )


def test_reexport_keeps_parity_and_the_signature_valid(bundle: Path, key) -> None:
    manifest = reexport(bundle, key)
    assert manifest.export["parity_max_abs_diff"] < 1e-4
    assert run_self_test(bundle, verify_bundle(bundle, key.public_key()))["fp32"]


def test_int8_variant_passes_the_gate_and_the_self_test(bundle: Path, data: Path, key) -> None:
    result = quantize_bundle(bundle, "int8", data / "faults", 120, max_drop=0.05, key=key)
    assert result.accepted
    manifest = verify_bundle(bundle, key.public_key())
    assert {v.name for v in manifest.variants} == {"fp32", "int8"}
    assert run_self_test(bundle, manifest)["int8"]


def test_int8_recipe_quantizes_the_gru_and_keeps_the_forecast_path_fp32(
    bundle: Path, data: Path, key, capsys: pytest.CaptureFixture[str]
) -> None:
    """Encoder, graph layer, decoder and fault head read fp32 inputs; the GRU reads INT8 ones."""
    quantize_bundle(bundle, "int8", data / "faults", 120, max_drop=0.05, key=key)
    assert capsys.readouterr().out == ""  # the calibrator's progress lines are not ours to print
    graph = onnx.load(str(bundle / "model.int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized = {
        n.name.split("/")[1].rstrip("_0123456789")
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[0] in dequantized
    }
    assert quantized == {"gru_x", "gru_h", "attend"}


def test_quantization_gate_refuses_a_degraded_variant(
    bundle: Path, data: Path, key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variant that lost what the network learned (here: untrained weights) is refused."""

    def degraded(source: Path, target: Path, *_: object) -> None:
        torch.manual_seed(99)
        net = SensorGraphNet(NetConfig(sensors=4, window=24, segments=4, hidden=16))
        export_onnx(net, target)

    monkeypatch.setattr(quantize_module, "_int8", degraded)
    before = (bundle / MANIFEST).read_bytes()
    with pytest.raises(FailedPrecondition, match="int8 variant refused: it does not reproduce"):
        quantize_bundle(bundle, "int8", data / "faults", 120, max_drop=0.01, key=key)
    assert (bundle / MANIFEST).read_bytes() == before
    assert not (bundle / "model.int8.onnx").exists()


def test_a_tampered_model_file_is_refused(bundle: Path, key) -> None:
    raw = bytearray((bundle / FP32_ONNX).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (bundle / FP32_ONNX).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        verify_bundle(bundle, key.public_key())


def test_a_tampered_manifest_is_refused(bundle: Path, key) -> None:
    text = (bundle / MANIFEST).read_text().replace('"smoothing": 3', '"smoothing": 4')
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_bundle(bundle, key.public_key())


def test_a_bundle_signed_by_another_key_is_refused(bundle: Path) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_bundle(bundle, other)


def test_tar_round_trip_and_a_path_escaping_tar_is_refused(
    bundle: Path, key, tmp_path: Path
) -> None:
    archive = pack(bundle, tmp_path / "b.tar")
    unpacked = unpack_tar(archive, tmp_path / "x")
    assert verify_bundle(unpacked, key.public_key()).name == "pump-test"
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(bundle / MANIFEST, arcname="../../escape.json")
    with pytest.raises(IntegrityError, match="not a readable bundle archive"):
        unpack_tar(evil, tmp_path / "y")
    assert not (tmp_path / "escape.json").exists()


def test_predict_is_causal_and_never_reads_labels(trained: Path, key, tmp_path: Path) -> None:
    src = tmp_path / "in" / "site.csv"
    write_experiment(src, seed=77, rows=300, fault=(200, 260))
    lines = src.read_text().splitlines()
    with load_model(trained, key.public_key()) as loaded:
        predict(loaded, src.parent, 120, tmp_path / "a")
        # Garbage labels, and different readings from row 240 on.
        changed = [lines[0]] + [
            ";".join([*line.split(";")[:-1], "not-a-label"]) for line in lines[1:]
        ]
        for i in range(241, len(changed)):
            cells = changed[i].split(";")
            cells[1] = "99"
            changed[i] = ";".join(cells)
        src.write_text("\n".join(changed) + "\n")
        predict(loaded, src.parent, 120, tmp_path / "b")
    a = (tmp_path / "a" / "site.csv").read_text().splitlines()
    b = (tmp_path / "b" / "site.csv").read_text().splitlines()
    assert a[0] == "datetime,score,anomaly"
    assert len(a) == len(b) == 1 + 300 - 120
    first_changed = 1 + (240 - 120)
    assert a[:first_changed] == b[:first_changed]
    assert a[first_changed:] != b[first_changed:]


def test_corrupt_golden_fails_the_self_test(bundle: Path, key) -> None:
    manifest = verify_bundle(bundle, key.public_key())
    with np.load(bundle / manifest.golden.file) as golden:
        arrays = {k: golden[k] for k in golden.files}
    arrays["fault_prob"] = arrays["fault_prob"] + 0.5
    np.savez(bundle / "wrong.npz", **arrays)
    shutil.copy(bundle / "wrong.npz", bundle / manifest.golden.file)
    with pytest.raises(IntegrityError, match="does not match"):
        verify_bundle(bundle, key.public_key())
    with pytest.raises(IntegrityError, match="fails the self-test"):
        run_self_test(bundle, manifest)


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/escape.bin", "a/../../x", "manifest.sig"])
def test_a_signed_manifest_naming_a_path_outside_its_bundle_is_refused(
    bundle: Path, key, tmp_path: Path, name: str
) -> None:
    """Refused when the manifest is read, so nothing is downloaded or written for it."""
    manifest = verify_bundle(bundle, key.public_key())
    doc = manifest.model_dump(mode="json")
    doc["files"][name] = "0" * 64
    raw = json.dumps(doc).encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(key.sign(raw))
    with pytest.raises(IntegrityError, match="not a plain relative path"):
        verify_bundle(bundle, key.public_key())
    with pytest.raises(IntegrityError, match="not a plain relative path"):
        read_signed_manifest(bundle, key.public_key())


def test_decision_fields_at_their_default_are_not_written_and_unknown_ones_say_upgrade(
    bundle: Path, key
) -> None:
    """An agent from before a decision field still loads bundles that do not use it; one that
    meets a field it does not know says to upgrade, not just "extra inputs"."""
    doc = json.loads((bundle / MANIFEST).read_bytes())
    assert "residual_tolerance" not in doc["decision"]  # empty: the default
    assert doc["decision"]["forecast_away"] is True  # not the default: written
    doc["decision"]["from_the_future"] = 1.0
    raw = json.dumps(doc).encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(key.sign(raw))
    with pytest.raises(IntegrityError, match="made for a newer agent; upgrade the agent"):
        read_signed_manifest(bundle, key.public_key())
