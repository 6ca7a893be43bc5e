"""Writing, signing and packing bundles (the cloud side of `edge_agent.bundle`)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import MANIFEST, SIGNATURE, Manifest, load_public_key, verify_bundle
from edge_agent.errors import ConfigError, InvalidInput
from edge_agent.files import replace_atomically
from edge_agent.trust import Verifier, parse_root

SIGNING_KEY_ENV = "AUTOGLM_SIGNING_KEY"
PUBLIC_KEY_ENV = "AUTOGLM_SIGNING_PUB"


def trusted_keys(path: Path | None, key: ed25519.Ed25519PrivateKey) -> Verifier:
    """The keys a bundle from the control plane may be signed by: those of the signing root
    beside the key file (`signing-root.json`, after a rotation), else the key itself."""
    path = path or (Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None)
    root = path.parent / "signing-root.json" if path is not None else None
    if root is not None and root.is_file():
        return parse_root(root.read_bytes(), str(root)).trusted()
    return key.public_key()


def load_signing_key(path: Path | None) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key that signs bundles: `path`, else $AUTOGLM_SIGNING_KEY."""
    if path is None:
        env = os.environ.get(SIGNING_KEY_ENV)
        if not env:
            raise ConfigError(
                "no signing key: pass --signing-key (the control plane's is "
                f"STATE_DIR/signing.key) or set {SIGNING_KEY_ENV}"
            )
        path = Path(env)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"signing key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"signing key {path}: not a PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: not an Ed25519 key")
    return key


def load_verify_key(
    public_path: Path | None, signing_path: Path | None
) -> ed25519.Ed25519PublicKey:
    """The key to verify with: `--public-key`, $AUTOGLM_SIGNING_PUB, or the signing key's."""
    if public_path is None and os.environ.get(PUBLIC_KEY_ENV):
        public_path = Path(os.environ[PUBLIC_KEY_ENV])
    if public_path is not None:
        try:
            return load_public_key(public_path.read_bytes(), str(public_path))
        except OSError as exc:
            raise ConfigError(f"public key {public_path}: {exc.strerror}") from None
    return load_signing_key(signing_path).public_key()


def write_signed_manifest(
    directory: Path, manifest: Manifest, key: ed25519.Ed25519PrivateKey
) -> None:
    """Write manifest.json and its signature (signature last: a crash leaves a refused bundle,
    never an accepted wrong one)."""
    doc = manifest.model_dump(mode="json")
    # Decision fields at their default are left out: they load as that default, so a bundle
    # that does not use a field added later still loads on an agent from before it.
    doc["decision"] = manifest.decision.model_dump(mode="json", exclude_defaults=True)
    raw = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    replace_atomically(directory / MANIFEST, raw, 0o644)
    replace_atomically(directory / SIGNATURE, key.sign(raw), 0o644)


def read_own_bundle(
    directory: Path, key: ed25519.Ed25519PrivateKey, trusted: Verifier | None = None
) -> Manifest:
    """Verify a bundle this key (or one of `trusted`) signed before changing it."""
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: no such bundle directory")
    return verify_bundle(directory, trusted or key.public_key())


def pack(directory: Path, archive: Path) -> Path:
    """A `.tar` of the bundle directory (one top-level folder named after it)."""
    tmp = archive.with_name(archive.name + ".partial")
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"{directory.name}/{path.relative_to(directory)}")
    tmp.replace(archive)
    return archive
