"""Small signed model bundles for rollout and recovery tests: one trained network, copied
under other versions and re-signed with the fleet's key."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from cloud.model.pipeline import TrainOptions, train_bundle
from cloud.model.train import TrainParams
from edge_agent.bundle import Manifest, sha256_file
from edge_agent.calibration import DecisionParams
from tests.support.sensordata import write_dataset


def small_options(name: str, epochs: int, seed: int) -> TrainOptions:
    """A small network that trains in seconds: what the tests that train share."""
    return TrainOptions(
        name=name,
        version="1",
        window=24,
        segments=4,
        stride=2,
        hidden=16,
        calibration_rows=120,
        train=TrainParams(epochs=epochs, seed=seed),
        # Thresholds are fitted for the default false-alarm budget on held-out normal data,
        # so the serving model is quiet on normal data and a jumpy candidate stands out.
        decision=DecisionParams(smoothing=3, level_window=8),
    )


OPTIONS = small_options("pump", epochs=3, seed=5)


def train_small(
    root: Path, options: TrainOptions = OPTIONS
) -> tuple[Path, ed25519.Ed25519PrivateKey]:
    """Trains the small model under `root`; returns its bundle and the key that signed it."""
    key = ed25519.Ed25519PrivateKey.generate()
    out = root / "bundle"
    train_bundle([write_dataset(root / "data")], out, options, key, log=lambda _: None)
    return out, key


def make_version(
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    dest: Path,
    version: str,
    key: ed25519.Ed25519PrivateKey,
    **changes: object,
) -> Path:
    """A copy of the trained bundle as `version`, signed with the fleet's key."""
    source, training_key = trained
    shutil.copytree(source, dest)
    manifest = read_own_bundle(dest, training_key)
    doc = manifest.model_dump(mode="json") | {"version": version}
    for dotted, value in changes.items():
        target = doc
        *path, last = dotted.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    write_signed_manifest(dest, Manifest.model_validate(doc), key)
    return dest


def break_golden(bundle: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """Golden outputs the model cannot reproduce, correctly listed and signed: only the
    device self-test can catch it."""
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_bytes())
    path = bundle / manifest.golden.file
    with np.load(path) as golden:
        arrays = {k: golden[k] for k in golden.files}
    arrays["fault_prob"] = arrays["fault_prob"] + 0.5
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    doc = manifest.model_dump(mode="json")
    doc["golden"]["sha256"] = sha256_file(path)
    write_signed_manifest(bundle, Manifest.model_validate(doc), key)
