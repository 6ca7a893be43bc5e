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

from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.pki import new_signing_key, private_key_pem, public_key_pem
from cloud.state_dir import (
    PUBLIC_MODE,
    SECRET_MODE,
    SIGNING_KEY,
    SIGNING_PUB,
    SIGNING_ROOT,
    load_secrets,
)
from edge_agent.errors import FailedPrecondition
from edge_agent.files import fsync_dir, replace_atomically, write_new
from edge_agent.trust import MAX_KEYS, key_id, parse_root, sign_root

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


def _trusted(state_dir: Path) -> tuple[int, list[ed25519.Ed25519PublicKey]]:
    secrets = load_secrets(state_dir)
    if not secrets.signing_root:
        return 1, [secrets.signing_key.public_key()]
    root = parse_root(secrets.signing_root, str(state_dir / SIGNING_ROOT))
    return root.version, list(root.keys.values())


def rotate(state_dir: Path, valid_for: dt.timedelta, now: dt.datetime) -> RootSummary:
    """A new signing key, trusted beside the current ones (see the module's docstring)."""
    current = load_secrets(state_dir).signing_key
    version, keys = _trusted(state_dir)
    if len(keys) >= MAX_KEYS:
        raise FailedPrecondition(
            f"{len(keys)} signing keys are trusted already; retire the old ones first "
            "(autoglm cloud signing-key retire)"
        )
    new = new_signing_key()
    document = sign_root(version + 1, now + valid_for, [*keys, new.public_key()], [current, new])
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


def retire(state_dir: Path, valid_for: dt.timedelta, now: dt.datetime) -> RootSummary:
    """A root that trusts the current signing key alone."""
    current = load_secrets(state_dir).signing_key
    version, keys = _trusted(state_dir)
    if len(keys) == 1:
        raise FailedPrecondition("only the current signing key is trusted; nothing to retire")
    document = sign_root(version + 1, now + valid_for, [current.public_key()], [current])
    replace_atomically(state_dir / SIGNING_ROOT, document, PUBLIC_MODE)
    fsync_dir(state_dir)
    return describe(state_dir)
