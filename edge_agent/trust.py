"""Which keys may sign model bundles: the key pinned at enrollment, then signed key lists.

A signing root (TUF-style) is a JSON document

    {"signed": {"kind": "autoglm-signing-root", "version": 2,
                "expires": "2027-11-29T00:00:00Z", "keys": {KEYID: BASE64, ...}},
     "signatures": [{"keyid": KEYID, "sig": BASE64}, ...]}

over Ed25519 keys (KEYID: the first 16 hex digits of the raw public key's sha256), signed
over the canonical JSON of `signed`. A device takes a root only when its version is newer
than the one it holds, it has not expired, and it is signed both by a key the device trusts
now (so only the current key holders can hand trust on) and by one of the keys it lists (so
a listed key's holder agreed). Its keys then replace the device's trusted keys: a bundle
signed by any of them verifies, one signed by a key it dropped no longer does.

Expiry guards the taking of new roots only. A root that has expired on a device still
verifies what it signed: an edge box offline for a year must still start its model.

A root may also list the fleet's TLS certificate authorities (`"cas": [PEM, ...]`, during a
CA change the old and the new one; `cloud/ca_rollover.py`): a device that takes it trusts
exactly those for its control plane from then on (`identity/ca.crt`). Carrying them in the
signed root means a leaked CA key alone cannot hand a device a CA: that takes a signing key.
Roots without the field leave the device's CAs as they were.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.errors import IntegrityError, LocalStateError
from edge_agent.files import make_dir_durably, replace_atomically

log = logging.getLogger(__name__)

KIND = "autoglm-signing-root"
MAX_ROOT_BYTES = 64 * 1024
MAX_KEYS = 16
MAX_CAS = 4


class Verifier(Protocol):
    """What checks a bundle's signature: raises `InvalidSignature` when it does not verify."""

    def verify(self, signature: bytes, data: bytes) -> None: ...


def raw_key(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_key(key)).hexdigest()[:16]


class TrustedKeys:
    """A signature verifies when any of the keys verifies it."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}
        if not self.keys:
            raise IntegrityError("no signing key is trusted")

    def verify(self, signature: bytes, data: bytes) -> None:
        for key in self.keys.values():
            try:
                key.verify(signature, data)
                return
            except InvalidSignature:
                continue
        raise InvalidSignature()

    def __contains__(self, keyid: object) -> bool:
        return keyid in self.keys


@dataclass(frozen=True)
class SigningRoot:
    version: int
    expires: dt.datetime
    keys: Mapping[str, ed25519.Ed25519PublicKey]  # key id -> key
    signatures: tuple[tuple[str, bytes], ...]  # (key id, signature over `body`)
    body: bytes  # the canonical JSON of `signed`
    document: bytes  # as received, for keeping and passing on
    cas: tuple[bytes, ...] = ()  # PEM CA certificates the fleet trusts; (): not said

    @property
    def ca_bundle(self) -> bytes:
        """The listed CAs as one PEM bundle (b"" when the root lists none)."""
        return b"".join(self.cas)

    def trusted(self) -> TrustedKeys:
        return TrustedKeys(self.keys.values())

    def verified_by(self, keys: Mapping[str, ed25519.Ed25519PublicKey]) -> set[str]:
        """The ids of `keys` whose signature over the root verifies."""
        found = set()
        for kid, signature in self.signatures:
            key = keys.get(kid)
            if key is None:
                continue
            try:
                key.verify(signature, self.body)
                found.add(kid)
            except InvalidSignature:
                continue
        return found


def canonical(signed: Mapping[str, Any]) -> bytes:
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign_root(
    version: int,
    expires: dt.datetime,
    keys: Iterable[ed25519.Ed25519PublicKey],
    signers: Iterable[ed25519.Ed25519PrivateKey],
    cas: Sequence[bytes] = (),
) -> bytes:
    """A root document listing `keys` (and the fleet's CA certificates `cas`, PEM, when
    given), signed by each of `signers`."""
    signed: dict[str, Any] = {
        "kind": KIND,
        "version": version,
        "expires": expires.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "keys": {key_id(k): base64.b64encode(raw_key(k)).decode() for k in keys},
    }
    if cas:
        signed["cas"] = [pem.decode("ascii") for pem in cas]
    body = canonical(signed)
    signatures = [
        {"keyid": key_id(s.public_key()), "sig": base64.b64encode(s.sign(body)).decode()}
        for s in signers
    ]
    return json.dumps({"signed": signed, "signatures": signatures}, indent=1).encode()


def parse_root(document: bytes, where: str) -> SigningRoot:
    """The root's fields, checked for form (no signature or trust decided here)."""
    if len(document) > MAX_ROOT_BYTES:
        raise IntegrityError(f"{where}: signing root of {len(document)} bytes is too large")
    try:
        doc = json.loads(document)
        signed = doc["signed"]
        if signed["kind"] != KIND:
            raise IntegrityError(f"{where}: not a signing root (kind {signed['kind']!r:.40})")
        version = signed["version"]
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**31:
            raise IntegrityError(f"{where}: signing root version {version!r:.40} is not valid")
        expires = dt.datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC
        )
        listed = signed["keys"]
        if not isinstance(listed, dict) or not 1 <= len(listed) <= MAX_KEYS:
            raise IntegrityError(f"{where}: a signing root lists 1 to {MAX_KEYS} keys")
        keys = {}
        for kid, text in listed.items():
            key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
            if key_id(key) != kid:
                raise IntegrityError(f"{where}: key id {str(kid)[:20]!r} does not match its key")
            keys[kid] = key
        entries = doc["signatures"]
        if not isinstance(entries, list) or len(entries) > MAX_KEYS * 2:
            raise IntegrityError(f"{where}: at most {MAX_KEYS * 2} signatures")
        signatures = tuple(
            (str(e["keyid"]), base64.b64decode(e["sig"], validate=True)) for e in entries
        )
        cas = _ca_certificates(signed.get("cas", []), where)
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error) as exc:
        raise IntegrityError(f"{where}: not a valid signing root: {exc!s:.200}") from None
    return SigningRoot(version, expires, keys, signatures, canonical(signed), document, cas)


def _ca_certificates(listed: object, where: str) -> tuple[bytes, ...]:
    """The root's `cas`: each one PEM certificate of a certificate authority."""
    if not isinstance(listed, list) or len(listed) > MAX_CAS:
        raise IntegrityError(f"{where}: a signing root lists at most {MAX_CAS} CAs")
    cas = []
    for i, text in enumerate(listed):
        if not isinstance(text, str):
            raise IntegrityError(f"{where}: cas[{i}] is not a PEM string")
        pem = text.encode("ascii")
        try:
            certs = x509.load_pem_x509_certificates(pem)
            constraints = certs[0].extensions.get_extension_for_class(x509.BasicConstraints)
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise IntegrityError(
                f"{where}: cas[{i}] is not a CA certificate: {exc!s:.120}"
            ) from None
        if len(certs) != 1 or not constraints.value.ca:
            raise IntegrityError(f"{where}: cas[{i}] is not one CA certificate")
        cas.append(pem)
    return tuple(cas)


class StaleRoot(IntegrityError):
    """A root not newer than the one held: nothing to do."""


def accept_root(
    document: bytes, trusted: TrustedKeys, current_version: int, now: dt.datetime
) -> SigningRoot:
    """The root in `document` if the device should take it; `IntegrityError` saying why not
    (`StaleRoot` for one not newer than what it holds)."""
    root = parse_root(document, "signing root")
    if root.version <= current_version:
        raise StaleRoot(f"signing root version {root.version}: version {current_version} is held")
    if root.expires <= now:
        raise IntegrityError(
            f"signing root version {root.version} expired at {root.expires:%Y-%m-%d %H:%M}Z"
        )
    if not root.verified_by(trusted.keys):
        raise IntegrityError(
            f"signing root version {root.version} is not signed by a key this device trusts "
            f"({', '.join(sorted(trusted.keys))})"
        )
    if not root.verified_by(root.keys):
        raise IntegrityError(
            f"signing root version {root.version} is not signed by any key it lists"
        )
    return root


ROOT_FILE = "signing-root.json"  # under the state dir's trust/


class DeviceTrust:
    """The keys this device trusts for bundles: those of the newest root it took (kept in
    `state_dir/trust/`), else the key pinned at enrollment. A `Verifier` whose keys change
    when a root is taken, so whoever holds it verifies with the current keys."""

    def __init__(self, state_dir: Path, pinned: ed25519.Ed25519PublicKey) -> None:
        self.path = state_dir / "trust" / ROOT_FILE
        self.root: SigningRoot | None = None
        self.keys = TrustedKeys([pinned])
        self.refused = 0  # roots refused (not signed by a trusted key, expired, malformed)
        if self.path.is_file():
            try:
                self.root = parse_root(self.path.read_bytes(), str(self.path))
                self.keys = self.root.trusted()
            except (OSError, IntegrityError) as exc:
                log.error("%s; trusting the key pinned at enrollment until a root arrives", exc)

    @property
    def version(self) -> int:
        return self.root.version if self.root is not None else 1

    def verify(self, signature: bytes, data: bytes) -> None:
        self.keys.verify(signature, data)

    def take(self, document: bytes, now: dt.datetime) -> bool:
        """Takes a root sent by the control plane; False when it is not newer. Raises
        `IntegrityError` (counted) for one the device must not take, `LocalStateError` when
        it cannot be kept (then the keys do not change)."""
        try:
            root = accept_root(document, self.keys, self.version, now)
        except StaleRoot:
            return False
        except IntegrityError:
            self.refused += 1
            raise
        try:
            make_dir_durably(self.path.parent)
            replace_atomically(self.path, document, 0o644)  # the folder synced too
        except OSError as exc:
            raise LocalStateError(f"{self.path}: cannot keep the signing root: {exc}") from None
        self.root, self.keys = root, root.trusted()
        log.info(
            "signing root version %d taken: bundles signed by %s verify",
            root.version,
            ", ".join(sorted(root.keys)),
        )
        return True
