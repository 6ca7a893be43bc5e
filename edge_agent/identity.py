"""The device's identity on disk: its private key (never leaves the device), certificate chain,
the control plane's CA and the pinned bundle-signing key."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_agent.errors import FailedPrecondition, IntegrityError, LocalStateError
from edge_agent.files import fsync_dir, replace_atomically, write_new

IDENTITY_DIR = "identity"
KEY_FILE, CERT_FILE, CA_FILE, SIGNING_FILE, INFO_FILE = (
    "device.key",
    "device.crt",
    "ca.crt",
    "signing.pub",
    "identity.yaml",
)


class IdentityInfo(BaseModel):
    """Who this device is and where its control plane is (identity.yaml)."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    device_name: str
    api_address: str
    device_address: str
    tls_server_name: str = ""
    enrolled_at: dt.datetime


@dataclass(frozen=True)
class DeviceIdentity:
    """A loaded identity: PEM material ready for gRPC channel credentials."""

    info: IdentityInfo
    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes
    signing_public_pem: bytes

    def clock_problem(self, now: dt.datetime) -> str:
        """Why TLS will refuse this device's certificates at `now`, or "" when the clock is
        inside every certificate's validity (the device's own and the fleet CA's)."""
        try:
            certs = [
                *x509.load_pem_x509_certificates(self.chain_pem),
                *x509.load_pem_x509_certificates(self.ca_pem),
            ]
        except ValueError:
            return ""
        for cert in certs:
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            if not start <= now <= end:
                return (
                    f"this device's clock says {now:%Y-%m-%d %H:%M:%S}Z, outside the validity "
                    f"of its certificates ({start:%Y-%m-%d %H:%M}Z .. {end:%Y-%m-%d %H:%M}Z): "
                    "TLS refuses them; set the clock (NTP) and the session comes back"
                )
        return ""

    def credentials(self) -> grpc.ChannelCredentials:
        """Mutual-TLS channel credentials: this device's key and chain, the fleet's CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.chain_pem,
        )


def new_device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issuer_of(leaf: x509.Certificate, ca_pem: bytes) -> x509.Certificate | None:
    """The CA of the bundle `ca_pem` that signed `leaf`, or None."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return None
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
            return ca
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def certificate_issuer(identity: DeviceIdentity) -> str:
    """The sha256 fingerprint of the trusted CA that issued this device's certificate ("" when
    none of them did): after a CA change, says whether the device renewed under the new CA."""
    try:
        leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    except (ValueError, IndexError):
        return ""
    ca = issuer_of(leaf, identity.ca_pem)
    if ca is None:
        return ""
    return hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_issued_certificate(
    key: ec.EllipticCurvePrivateKey, chain_pem: bytes, ca_pem: bytes
) -> x509.Certificate:
    """The returned certificate must carry our key and be signed by a CA we trust (`ca_pem`
    may hold several: the old and the new one during a CA change)."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, IndexError) as exc:
        raise IntegrityError(
            f"the control plane returned an unreadable certificate: {exc}"
        ) from None
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if mine != theirs:
        raise IntegrityError("the issued certificate is not for this device's key")
    if issuer_of(leaf, ca_pem) is None:
        raise IntegrityError("the issued certificate is not signed by a CA this device trusts")
    return leaf


def replace_ca_bundle(state_dir: Path, bundle_pem: bytes) -> bool:
    """Makes `bundle_pem` the CAs this device trusts for its control plane (from a signing
    root that lists them); False when they are those already."""
    path = identity_dir(state_dir) / CA_FILE
    try:
        if path.read_bytes() == bundle_pem:
            return False
        replace_atomically(path, bundle_pem, 0o644)
        fsync_dir(path.parent)
    except OSError as exc:
        raise LocalStateError(f"{path}: cannot write the trusted CAs: {exc.strerror}") from None
    return True


def identity_dir(state_dir: Path) -> Path:
    return state_dir / IDENTITY_DIR


def ensure_writable(state_dir: Path) -> None:
    """Fails early (before a token is spent) when the state directory cannot be written."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".probe-"):
            pass
    except OSError as exc:
        raise LocalStateError(
            f"state directory {state_dir} is not writable: {exc.strerror}"
        ) from None
    if identity_dir(state_dir).exists():
        raise FailedPrecondition(
            f"{state_dir} holds an enrolled identity already ({identity_dir(state_dir)}); "
            "use another --state-dir, or remove that folder to enroll again"
        )


def save_identity(
    state_dir: Path,
    key: ec.EllipticCurvePrivateKey,
    chain_pem: bytes,
    ca_pem: bytes,
    signing_public_pem: bytes,
    info: IdentityInfo,
) -> Path:
    """Writes the identity into a staging folder, then renames it into place in one step."""
    target = identity_dir(state_dir)
    staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=state_dir))
    try:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_new(staging / KEY_FILE, key_pem, 0o600)
        write_new(staging / CERT_FILE, chain_pem, 0o644)
        write_new(staging / CA_FILE, ca_pem, 0o644)
        write_new(staging / SIGNING_FILE, signing_public_pem, 0o644)
        text = yaml.safe_dump(info.model_dump(mode="json"), sort_keys=False)
        write_new(staging / INFO_FILE, text.encode(), 0o644)
        os.chmod(staging, 0o700)
        staging.rename(target)
        fsync_dir(state_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalStateError(
            f"cannot write the identity into {state_dir}: {exc.strerror}"
        ) from None
    return target


def load_identity(state_dir: Path) -> DeviceIdentity:
    folder = identity_dir(state_dir)
    if not (folder / INFO_FILE).exists():
        raise FailedPrecondition(
            f"{state_dir} holds no enrolled identity; run `autoglm-edge enroll --bootstrap FILE "
            f"--state-dir {state_dir}` first"
        )

    def read(name: str) -> bytes:
        try:
            return (folder / name).read_bytes()
        except OSError as exc:
            raise LocalStateError(f"{folder / name}: cannot read: {exc.strerror}") from None

    try:
        info = IdentityInfo.model_validate(yaml.safe_load(read(INFO_FILE)))
    except (ValidationError, yaml.YAMLError) as exc:
        raise IntegrityError(f"{folder / INFO_FILE} is corrupt: {exc}") from None
    return DeviceIdentity(
        info=info,
        key_pem=read(KEY_FILE),
        chain_pem=read(CERT_FILE),
        ca_pem=read(CA_FILE),
        signing_public_pem=read(SIGNING_FILE),
    )
