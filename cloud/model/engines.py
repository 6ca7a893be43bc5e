"""`model build-engines`: TensorRT plans per device profile, where TensorRT and a GPU exist."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from edge_agent.bundle import Manifest, Variant, sha256_file
from edge_agent.errors import InvalidInput
from edge_agent.inference.tensorrt import build_engine, require_tensorrt

PROFILE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def build_engines(
    directory: Path, profiles: list[str], precision: str, key: ed25519.Ed25519PrivateKey
) -> Manifest:
    """Build one plan per profile from the matching ONNX variant; re-sign the manifest.

    Without TensorRT this raises FailedPrecondition before touching the bundle, which stays
    marked build-on-device.
    """
    manifest = read_own_bundle(directory, key)
    require_tensorrt()
    source = manifest.variant(precision)
    if source.format != "onnx":
        raise InvalidInput(f"variant {precision!r} is not ONNX; build engines from an ONNX variant")
    variants = list(manifest.variants)
    engines = dict(manifest.engines)
    for profile in profiles:
        if not profile or not set(profile) <= PROFILE_CHARS:
            raise InvalidInput(f"--profile {profile!r}: use lower-case letters, digits, - _ .")
        plan = Path("engines") / f"{profile}.{precision}.plan"
        (directory / plan).parent.mkdir(exist_ok=True)
        build_engine(
            directory / source.file,
            directory / plan,
            manifest.window.length,
            len(manifest.sensors),
            precision,
        )
        name = f"trt-{profile}-{precision}"
        variants = [v for v in variants if v.name != name] + [
            Variant(
                name=name,
                file=str(plan),
                format="tensorrt",
                precision=source.precision,
                target_profile=profile,
                sha256=sha256_file(directory / plan),
            )
        ]
        engines[profile] = "built"
    engines["status"] = "built"
    updated = manifest.model_copy(update={"variants": variants, "engines": engines})
    write_signed_manifest(directory, updated, key)
    return updated
