"""Rotating the key that signs model bundles, without re-enrolling the fleet.

`rotate` makes a new key and a signing root (`edge_agent/trust.py`) one version up that
lists the keys trusted so far and the new one, signed by the current key (which devices
trust) and by the new key. The new key signs from then on. `retire` then writes a root
that lists the current key alone: bundles signed by a retired key no longer verify
anywhere. Control planes read the root at start (restart them, a rolling restart in
Kubernetes) and hand it to every agent at the start of its session, before its desired
state; agents take it only when a key they trust signed it.

Order on disk, for a crash at any point: the root first (it lists both keys), then the
new private key, then its public half; the retired private key is kept under
`retired-keys/`, never deleted.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.artifacts import LocalArtifactStore
from cloud.config import load_cloud_config
from cloud.domain import DeviceRecord, DeviceState
from cloud.pki import new_signing_key, private_key_pem, public_key_pem
from cloud.state_dir import (
    PUBLIC_MODE,
    SECRET_MODE,
    SIGNING_KEY,
    SIGNING_PUB,
    SIGNING_ROOT,
    load_secrets,
)
from cloud.store import open_store
from edge_agent.errors import FailedPrecondition, NotFound
from edge_agent.files import fsync_dir, replace_atomically, write_new
from edge_agent.trust import MAX_KEYS, TrustedKeys, key_id, parse_root, sign_root

RETIRED = "retired-keys"


@dataclass(frozen=True)
class RootSummary:
    version: int
    expires: dt.datetime | None  # None: no root yet (the signing key alone)
    keys: tuple[str, ...]  # key ids
    current: str  # the id of the key that signs now

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "expires": self.expires.isoformat() if self.expires else None,
            "keys": list(self.keys),
            "current": self.current,
        }


def describe(state_dir: Path) -> RootSummary:
    secrets = load_secrets(state_dir)
    current = key_id(secrets.signing_key.public_key())
    if not secrets.signing_root:
        return RootSummary(1, None, (current,), current)
    root = parse_root(secrets.signing_root, str(state_dir / SIGNING_ROOT))
    return RootSummary(root.version, root.expires, tuple(sorted(root.keys)), current)


@dataclass(frozen=True)
class HeldRoot:
    """What the state dir's signing root says now (version 1: the signing key alone)."""

    version: int
    keys: list[ed25519.Ed25519PublicKey]
    cas: tuple[bytes, ...]  # the fleet CAs it lists; (): none (the CA alone)


def held_root(state_dir: Path) -> HeldRoot:
    secrets = load_secrets(state_dir)
    if not secrets.signing_root:
        return HeldRoot(1, [secrets.signing_key.public_key()], ())
    root = parse_root(secrets.signing_root, str(state_dir / SIGNING_ROOT))
    return HeldRoot(root.version, list(root.keys.values()), root.cas)


def root_signers(
    state_dir: Path, keys: list[ed25519.Ed25519PublicKey]
) -> list[ed25519.Ed25519PrivateKey]:
    """The current signing key and the archived private keys of `keys`: a root they all
    sign is taken by a device that trusts any of them (one that missed earlier roots too)."""
    current = load_secrets(state_dir).signing_key
    archived = [
        k
        for k in (_archived(state_dir, key_id(pub)) for pub in keys)
        if k is not None and key_id(k.public_key()) != key_id(current.public_key())
    ]
    return [current, *archived]


def rotate(state_dir: Path, valid_for: dt.timedelta, now: dt.datetime) -> RootSummary:
    """A new signing key, trusted beside the current ones (see the module's docstring)."""
    current = load_secrets(state_dir).signing_key
    held = held_root(state_dir)
    version, keys = held.version, held.keys
    if len(keys) >= MAX_KEYS:
        raise FailedPrecondition(
            f"{len(keys)} signing keys are trusted already; retire the old ones first "
            "(autoglm cloud signing-key retire)"
        )
    new = new_signing_key()
    document = sign_root(
        version + 1, now + valid_for, [*keys, new.public_key()], [current, new], held.cas
    )
    retired = state_dir / RETIRED
    retired.mkdir(mode=0o700, exist_ok=True)
    archived = retired / f"signing-{key_id(current.public_key())}.key"
    if not archived.exists():
        write_new(archived, private_key_pem(current), SECRET_MODE)
    replace_atomically(state_dir / SIGNING_ROOT, document, PUBLIC_MODE)
    replace_atomically(state_dir / SIGNING_KEY, private_key_pem(new), SECRET_MODE)
    replace_atomically(state_dir / SIGNING_PUB, public_key_pem(new), PUBLIC_MODE)
    fsync_dir(state_dir)
    return describe(state_dir)


def retire(
    state_dir: Path, valid_for: dt.timedelta, now: dt.datetime, force: bool = False
) -> RootSummary:
    """A root that trusts the current signing key alone. Refused (unless `force`) while a
    device serves, or is meant to serve, a version that only a retired key signed: it would
    no longer verify there, and the device would start without a model. Signed by the
    retired keys kept under `retired-keys/` too, so a device that never took the previous
    root (offline, or an older agent since upgraded) can still take this one."""
    current = load_secrets(state_dir).signing_key
    held = held_root(state_dir)
    version, keys = held.version, held.keys
    if len(keys) == 1:
        raise FailedPrecondition("only the current signing key is trusted; nothing to retire")
    if not force:
        stranded = _in_use_by_retired(state_dir, TrustedKeys([current.public_key()]))
        if stranded:
            raise FailedPrecondition(
                "still in use and signed only by a key to retire: "
                + ", ".join(stranded[:10])
                + " (roll out a version signed by the current key first, or --force)"
            )
    signers = root_signers(state_dir, keys)
    document = sign_root(version + 1, now + valid_for, [current.public_key()], signers, held.cas)
    replace_atomically(state_dir / SIGNING_ROOT, document, PUBLIC_MODE)
    fsync_dir(state_dir)
    return describe(state_dir)


def _archived(state_dir: Path, kid: str) -> ed25519.Ed25519PrivateKey | None:
    path = state_dir / RETIRED / f"signing-{kid}.key"
    if not path.is_file():
        return None
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key if isinstance(key, ed25519.Ed25519PrivateKey) else None


def _in_use_by_retired(state_dir: Path, keep: TrustedKeys) -> list[str]:
    """NAME:VERSION (and who) of what devices serve or are meant to serve whose bundle
    `keep` does not verify."""
    config = load_cloud_config(state_dir)
    store = open_store(config.resolved_database_url)
    artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
    try:
        users: dict[tuple[str, str], str] = {}
        for device in store.list_devices({}):
            status = device.status or {}
            name, version = str(status.get("model_name", "")), str(status.get("model_version", ""))
            if version:
                users.setdefault((name, version), f"serving on {device.name}")
        revision = 0
        while batch := store.desired_after(revision, 500):
            for d in batch:
                if d.model_version:
                    users.setdefault((d.model_name, d.model_version), "desired")
            revision = batch[-1].revision
        stranded = []
        for (name, version), who in sorted(users.items()):
            try:
                model = store.get_model(name, version)
            except NotFound:
                continue  # not pushed here: a bundle in an agent's config
            manifest = b"".join(artifacts.read(model.manifest_digest))
            signature = b"".join(artifacts.read(model.signature_digest))
            try:
                keep.verify(signature, manifest)
            except InvalidSignature:
                stranded.append(f"{name}:{version} ({who})")
        return stranded
    finally:
        store.close()


def enrolled_devices(state_dir: Path) -> list[DeviceRecord]:
    """The active devices in the state dir's store, with what each last reported."""
    config = load_cloud_config(state_dir)
    store = open_store(config.resolved_database_url)
    try:
        return [d for d in store.list_devices({}) if d.state is DeviceState.ACTIVE]
    finally:
        store.close()


def devices_without_roots(state_dir: Path) -> list[str]:
    """Names of enrolled devices whose agent has reported no signing root version: too old to
    follow a rotation (or not heard from since an upgrade). Warned about before a rotation."""
    return sorted(
        d.name
        for d in enrolled_devices(state_dir)
        if not int((d.status or {}).get("signing_root_version", 0) or 0)
    )
