"""The control plane's state directory: created whole by `init`, read by `serve`."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.config import CONFIG_FILE, CloudConfig, load_cloud_config
from cloud.pki import (
    CertificateAuthority,
    new_private_key,
    new_signing_key,
    private_key_pem,
    public_key_pem,
)
from cloud.store import open_store
from cloud.tokens import OPERATOR_PREFIX, hash_token, new_token
from edge_agent.errors import FailedPrecondition, IntegrityError, LocalStateError
from edge_agent.files import write_new
from edge_agent.settings import load_settings
from edge_agent.trust import TrustedKeys, key_id, parse_root

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
SIGNING_KEY, SIGNING_PUB = "signing.key", "signing.pub"
SIGNING_ROOT = "signing-root.json"  # after a key rotation (cloud/signing_keys.py)
# A CA change (cloud/ca_rollover.py): the CA introduced but not yet issuing, both CAs for
# operators' tools, and the key material the secret box and console sessions keep using.
CA_NEXT_KEY, CA_NEXT_CERT = "ca-next.key", "ca-next.crt"
CA_BUNDLE, BOX_KEY = "ca-bundle.pem", "box.key"
SECRET_MODE, PUBLIC_MODE = 0o600, 0o644


@dataclass(frozen=True)
class ControlPlaneSecrets:
    """Keys and certificates the running control plane needs."""

    ca: CertificateAuthority
    server_key_pem: bytes
    server_chain_pem: bytes
    signing_key: ed25519.Ed25519PrivateKey
    # The signed list of bundle-signing keys since the first rotation; b"": only signing.key.
    signing_root: bytes = b""
    # Secret-box / session-seal key material kept across a CA change; b"": the CA key's.
    box_key: bytes = b""

    @property
    def trusted_ca_pem(self) -> bytes:
        """The CAs whose certificates are accepted, and that devices and operators should
        trust: those the signing root lists (old and new during a CA change), else the CA."""
        if self.signing_root:
            root = parse_root(self.signing_root, SIGNING_ROOT)
            if root.cas:
                return root.ca_bundle
        return self.ca.cert_pem

    @property
    def key_material(self) -> bytes:
        """What the secret box and console sessions derive their keys from: stable across a
        CA change (the first CA's key, kept in box.key when the CA changed)."""
        return self.box_key or self.ca.key_material()

    @property
    def signing_public_pem(self) -> bytes:
        return public_key_pem(self.signing_key)

    def trusted_keys(self) -> TrustedKeys:
        """The keys whose bundles are accepted: the root's, else the signing key."""
        if self.signing_root:
            return parse_root(self.signing_root, SIGNING_ROOT).trusted()
        return TrustedKeys([self.signing_key.public_key()])


@dataclass(frozen=True)
class InitResult:
    config: CloudConfig
    operator_token: str


def init_state_dir(
    state_dir: Path,
    hosts: list[str],
    database_url: str = "",
    api_listen: str | None = None,
    device_listen: str | None = None,
    operator_name: str = "admin",
) -> InitResult:
    """Creates CA, server certificate, signing key, config, schema and a first operator token.

    Everything is written into a temporary sibling directory and renamed into place at the
    end, so a failure leaves nothing half-written.
    """
    state_dir = state_dir.absolute()
    overrides = {
        "state_dir": state_dir,
        "hosts": hosts,
        "database_url": database_url,
        "api_listen": api_listen,
        "device_listen": device_listen,
    }
    config = load_settings(CloudConfig, None, overrides)  # validates before anything is written
    if state_dir.exists() and (not state_dir.is_dir() or any(state_dir.iterdir())):
        raise FailedPrecondition(
            f"{state_dir} exists and is not empty; refusing to overwrite a control plane's keys"
        )
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{state_dir.name}.init-", dir=state_dir.parent))
    except OSError as exc:
        raise LocalStateError(f"cannot create {state_dir}: {exc.strerror}") from None
    try:
        _write_secrets(staging, config.hosts)
        saved = {k: v for k, v in config.model_dump(mode="json").items() if k != "state_dir"}
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False), "utf-8")
        url = database_url or f"sqlite:///{staging / 'autoglm.db'}"
        token = new_token(OPERATOR_PREFIX)
        store = open_store(url)
        try:
            store.add_operator(
                operator_name, hash_token(token), dt.datetime.now(dt.UTC), role="admin"
            )
        finally:
            store.close()
        if state_dir.exists():
            state_dir.rmdir()
        staging.rename(state_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LocalStateError(f"cannot write {state_dir}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InitResult(config=load_cloud_config(state_dir), operator_token=token)


def _write_secrets(directory: Path, hosts: list[str]) -> None:
    ca = CertificateAuthority.create()
    server_key = new_private_key()
    server_cert = ca.issue_server_certificate(hosts, server_key)
    signing = new_signing_key()
    write_new(directory / CA_KEY, private_key_pem(ca.key), SECRET_MODE)
    write_new(directory / CA_CERT, ca.cert_pem, PUBLIC_MODE)
    write_new(directory / SERVER_KEY, private_key_pem(server_key), SECRET_MODE)
    write_new(
        directory / SERVER_CERT,
        server_cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem,
        PUBLIC_MODE,
    )
    write_new(directory / SIGNING_KEY, private_key_pem(signing), SECRET_MODE)
    write_new(directory / SIGNING_PUB, public_key_pem(signing), PUBLIC_MODE)


def load_secrets(state_dir: Path) -> ControlPlaneSecrets:
    """Reads the keys written by `init_state_dir`; errors name the missing or bad file."""

    def read(name: str) -> bytes:
        try:
            return (state_dir / name).read_bytes()
        except OSError as exc:
            raise LocalStateError(f"{state_dir / name}: cannot read: {exc.strerror}") from None

    try:
        ca = CertificateAuthority.load(read(CA_KEY), read(CA_CERT))
        signing = serialization.load_pem_private_key(read(SIGNING_KEY), password=None)
    except ValueError as exc:
        raise IntegrityError(f"{state_dir}: a key or certificate file is corrupt: {exc}") from None
    if not isinstance(signing, ed25519.Ed25519PrivateKey):
        raise IntegrityError(f"{state_dir / SIGNING_KEY}: not an Ed25519 key")
    root = read(SIGNING_ROOT) if (state_dir / SIGNING_ROOT).exists() else b""
    if root:
        held = parse_root(root, str(state_dir / SIGNING_ROOT))
        if key_id(signing.public_key()) not in held.keys:
            raise IntegrityError(
                f"{state_dir / SIGNING_KEY}: not one of the keys {state_dir / SIGNING_ROOT} "
                "lists; devices would refuse what it signs"
            )
    box_key = read(BOX_KEY) if (state_dir / BOX_KEY).exists() else b""
    if (state_dir / BOX_KEY).exists() and not box_key:
        raise IntegrityError(f"{state_dir / BOX_KEY}: empty (webhook secrets need its key)")
    if not box_key and read(CA_CERT).count(b"-----BEGIN CERTIFICATE-----") > 1:
        raise IntegrityError(
            f"{state_dir}: the CA changed (ca.crt holds two) but {BOX_KEY} is missing: webhook "
            "secrets and console sessions need it (in Kubernetes: secrets.boxKey)"
        )
    return ControlPlaneSecrets(
        ca=ca,
        server_key_pem=read(SERVER_KEY),
        server_chain_pem=read(SERVER_CERT),
        signing_key=signing,
        signing_root=root,
        box_key=box_key,
    )
