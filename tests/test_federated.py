"""Federated fine-tuning (`cloud/model/federated.py`): two sites of the learning loop's pump
(tests/support/learning_site.py, noise seeds 7 and 8; each with its benign dips and its fault)
keep their exports; each runs `autoglm model train-local` on its own and sends an update file
of weight deltas and numbers only; `autoglm model federate` averages them (FedAvg, one round)
into a signed bundle. Measured against `autoglm model train --from-export` on the union of
both exports with the same epochs, batch and seed, scored as the agents score (each site's
own calibration on its stream)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.cli.main import run as autoglm
from cloud.model.bundle_writer import read_own_bundle
from cloud.model.federated import DELTA, META, META_KEYS, TOLERANCE, read_update, write_update
from cloud.model.pipeline import load_checkpoint
from edge_agent.simulate import Stream
from tests.support.learning_site import CALIBRATION, site_stream
from tests.support.sensordata import SENSORS
from tests.support.site_exports import T0, export_of, site_captures, stream_scores

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
DEVICES = ("edge-a", "edge-b")
# As tests/support/learning_site.py's fine_tune: 40 epochs of batch 32, one torch thread.
TRAINING = ["--epochs", "40", "--batch-size", "32", "--threads", "1", "--seed", "0"]


@dataclass(frozen=True)
class Sites:
    base: Path
    key: ed25519.Ed25519PrivateKey
    key_file: Path
    public_file: Path
    streams: dict[str, Stream]
    exports: dict[str, Path]
    union: Path
    window_end: dict[str, dict[int, str]]  # device -> exported window's end row -> verdict


@pytest.fixture(scope="module")
def sites(
    trained: tuple[Path, ed25519.Ed25519PrivateKey], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp("federated")
    base, key = trained
    key_file, public_file = root / "signing.key", root / "signing.pub"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    streams = {d: site_stream(seed) for d, seed in zip(DEVICES, (7, 8), strict=True)}
    captured = {d: site_captures(base, key.public_key(), s, d) for d, s in streams.items()}
    yield Sites(
        base,
        key,
        key_file,
        public_file,
        streams,
        {d: export_of(c, root / f"export-{d}") for d, c in captured.items()},
        export_of([x for c in captured.values() for x in c], root / "export-union"),
        {
            d: {round(r.window_end.timestamp() - T0): label.verdict for r, label, _ in c}
            for d, c in captured.items()
        },
    )


def train_local(sites: Sites, device: str, out: Path, *extra: str) -> Path:
    """`autoglm model train-local` at the site, verifying the base with the public key only."""
    args = ["--from-export", str(sites.exports[device]), "--base", str(sites.base)]
    code = autoglm(
        ["model", "train-local", *args, "--out", str(out), "--public-key",
         str(sites.public_file), *(extra or TRAINING)]
    )  # fmt: skip
    assert code == 0
    return out


def federate(sites: Sites, updates: list[Path], out: Path) -> int:
    return autoglm(
        ["model", "federate", "--base", str(sites.base), *(a for u in updates for a in
         ("--update", str(u))), "--out", str(out), "--model-version", "2", "--signing-key",
         str(sites.key_file)]
    )  # fmt: skip


def test_a_site_update_holds_weight_deltas_and_numbers_only(sites: Sites, tmp_path: Path) -> None:
    update = train_local(sites, "edge-a", tmp_path / "a.npz", "--epochs", "2", "--threads", "1")
    state = load_checkpoint(sites.base).state_dict()
    n = len(SENSORS)
    with np.load(update, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop(META)))
    expected = {DELTA + k: tuple(v.shape) for k, v in state.items()}
    expected |= {TOLERANCE + k: (n,) for k in ("level", "spread", "residual", "subspace")}
    assert {k: a.shape for k, a in arrays.items()} == expected
    assert all(a.dtype == np.float32 for a in arrays.values())
    # The only other thing in it: small JSON of names and numbers; no list as long as a
    # window's values, no timestamp, calibration or reading.
    assert set(meta) == META_KEYS, meta
    assert (
        meta["base"]["checkpoint_sha256"]
        == read_own_bundle(sites.base, sites.key).files["model.pt"]
    )

    def lists(doc: object) -> Iterator[list[object]]:
        if isinstance(doc, list):
            yield doc
        children = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else ()
        for child in children:
            yield from lists(child)

    assert max(len(x) for x in lists(meta)) <= n, meta
    text = json.dumps(meta)
    for word in ('"timestamps"', '"window_start"', '"calibration"', '"values"', '"input_center"',
                 '"mask"', "edge-a"):  # fmt: skip
        assert word not in text, word
    assert meta["training_windows"] > 0 and meta["fault_windows"] > 0, meta
    moved = sum(float(np.abs(arrays[DELTA + k]).sum()) for k in state)
    assert moved > 0  # the site's network did change


def test_federate_takes_the_window_weighted_mean_of_the_deltas_and_the_largest_tolerances(
    sites: Sites, tmp_path: Path
) -> None:
    real = read_update(train_local(sites, "edge-a", tmp_path / "a.npz", "--epochs", "1"))
    ones = {k: np.full_like(v, 0.01) for k, v in real.delta.items()}

    def vector(*x: float) -> np.ndarray:
        return np.asarray(x, np.float32)

    a = dataclasses.replace(real, delta=ones, training_windows=30, tolerance={
        "level": vector(2, 2, 2, 2), "spread": vector(1, 1, 1, 1), "residual": vector(1, 3, 1, 1),
        "subspace": vector(1, 1, 1, 1),
    })  # fmt: skip
    # b as an update from before the subspace kind: no subspace tolerance (the base's taken)
    b = dataclasses.replace(real, delta={k: 5 * v for k, v in ones.items()}, training_windows=10,
                            tolerance={"level": vector(1, 1, 4, 1), "spread": vector(1, 1, 1, 1),
                                       "residual": vector(1, 1, 1, 1)})  # fmt: skip
    write_update(tmp_path / "ua.npz", a)
    write_update(tmp_path / "ub.npz", b)
    out = tmp_path / "fed"
    assert federate(sites, [tmp_path / "ua.npz", tmp_path / "ub.npz"], out) == 0
    base, new = load_checkpoint(sites.base).state_dict(), load_checkpoint(out).state_dict()
    for k, v in base.items():  # 0.75 * 0.01 + 0.25 * 0.05
        torch.testing.assert_close(new[k], v + 0.02, atol=1e-6, rtol=0)
    manifest = read_own_bundle(out, sites.key)
    assert manifest.decision.level_tolerance == (2.0, 2.0, 4.0, 2.0)
    assert manifest.decision.residual_tolerance == (1.0, 3.0, 1.0, 1.0)
    base_decision = read_own_bundle(sites.base, sites.key).decision
    assert manifest.decision.spread_tolerance == base_decision.spread_tolerance  # none raised
    flat = (1.0,) * len(SENSORS)
    np.testing.assert_allclose(  # a's ones, b's the base's: the larger of each
        manifest.decision.subspace_tolerance or flat,
        np.maximum(1.0, base_decision.subspace_tolerance or flat),
        atol=1e-4,
    )
    fed = manifest.training["federated"]
    assert isinstance(fed, dict)
    assert [u["weight"] for u in fed["updates"]] == [0.75, 0.25]
    assert manifest.export["parity_max_abs_diff"] < 1e-3  # the golden vectors: base inputs
    assert autoglm(["model", "verify", str(out), "--signing-key", str(sites.key_file)]) == 0


def test_updates_from_another_base_or_of_other_shapes_are_refused_by_name(
    sites: Sites, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = read_update(train_local(sites, "edge-b", tmp_path / "b.npz", "--epochs", "1"))
    write_update(tmp_path / "other-base.npz", dataclasses.replace(real, base_digest="0" * 64))
    first = next(iter(real.delta))
    bent = {**real.delta, first: np.zeros((1, 2), np.float32)}
    write_update(tmp_path / "bent.npz", dataclasses.replace(real, delta=bent))
    capsys.readouterr()
    assert federate(sites, [tmp_path / "b.npz", tmp_path / "other-base.npz"], tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "other-base.npz: made from pump:1 (checkpoint 000000000000)" in err, err
    assert federate(sites, [tmp_path / "bent.npz"], tmp_path / "y") == 2
    err = capsys.readouterr().err
    assert f"bent.npz: delta of '{first}' is float32[1, 2]" in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_one_federated_round_matches_centralised_fine_tuning_within_tolerance(
    sites: Sites, tmp_path: Path
) -> None:
    """Stated tolerance (README), set from training seeds 0 and 1: both models quiet every
    exported false alarm (under 1) and keep every exported fault window at or above 1; on the
    exported false-alarm and sampled normal windows their scores differ by at most 0.1 on
    average (measured 0.025-0.039; centralised seed 0 against seed 1 on calm windows:
    0.009-0.015); on the fault windows, whose scores run from 3 to 80, by at most 0.25 in mean
    |log| ratio (measured 0.06-0.15); and on every window after calibration they agree on
    alerting (score >= 1) for at least 97 % (measured 98.5-99.0 %; centralised against itself
    with another seed: 98.8 %)."""
    central = tmp_path / "central"
    assert autoglm(
        ["model", "train", "--from-export", str(sites.union), "--base", str(sites.base),
         "--out", str(central), "--model-version", "2", "--signing-key", str(sites.key_file),
         *TRAINING]
    ) == 0  # fmt: skip
    updates = [train_local(sites, d, tmp_path / f"{d}.npz") for d in DEVICES]
    fed = tmp_path / "federated"
    assert federate(sites, updates, fed) == 0
    key = sites.key.public_key()
    lines = []
    for device, stream in sites.streams.items():
        ends, c = stream_scores(central, key, stream)
        _, f = stream_scores(fed, key, stream)
        verdict = np.asarray([sites.window_end[device].get(int(e), "-") for e in ends])
        alarms, faults, samples = verdict == "false", verdict == "true", verdict == ""
        calm = alarms | samples
        after = ends >= CALIBRATION
        gap = float(np.abs(c - f)[calm].mean())
        log_gap = float(np.abs(np.log(f[faults] / c[faults])).mean())
        agree = float(((c >= 1) == (f >= 1))[after].mean())
        lines.append(
            f"{device}: false alarms ({alarms.sum()}) max central {c[alarms].max():.2f} "
            f"federated {f[alarms].max():.2f}; faults ({faults.sum()}) min {c[faults].min():.2f}"
            f" / {f[faults].min():.2f}, mean {c[faults].mean():.1f} / {f[faults].mean():.1f}; "
            f"mean |c-f| on false alarms and samples {gap:.3f}; fault mean |log ratio| "
            f"{log_gap:.3f}; alert agreement {100 * agree:.1f} % of {after.sum()} windows"
        )
        assert c[alarms].max() < 1.0 and f[alarms].max() < 1.0, lines
        assert c[faults].min() >= 1.0 and f[faults].min() >= 1.0, lines
        assert gap <= 0.1 and log_gap <= 0.25 and agree >= 0.97, lines
    print("\n".join(lines))
