"""Changing the fleet's TLS certificate authority without re-enrolling any device.

Three steps, each followed by a restart of the control plane (a rolling restart in
Kubernetes), as for the signing key:

1. `rotate`: a new CA (`ca-next.key`, `ca-next.crt`) is introduced. The signing root goes one
   version up, listing both CAs (`edge_agent/trust.py`): the control plane accepts device
   certificates from either, and every agent takes the root at session open and trusts both
   for its control plane. `ca-bundle.pem` (both) is for operators' tools.
2. `activate`: the new CA issues from now on (enrollments, renewals). Devices whose
   certificate the old CA issued are asked to renew at their next session open. The server
   certificate stays the old CA's, so a device that missed step 1 (offline) still connects,
   then takes the root and renews. The old CA is archived under `retired-cas/`; the secret
   box and console sessions keep deriving their keys from the first CA's key (`box.key`).
3. `retire`: refused (unless `--force`) while a device has not reported a certificate from the
   current CA. Then a root listing the current CA alone, and a server certificate it issues:
   certificates of the old CA are refused from the restart on.

Every step can be run again after a crash: files are written in an order that leaves a state
the control plane can start in, and a repeated step finishes what was not done.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.config import load_cloud_config
from cloud.pki import CertificateAuthority, certificate_fingerprint, new_private_key
from cloud.pki import private_key_pem as key_pem
from cloud.signing_keys import enrolled_devices, held_root, root_signers
from cloud.state_dir import (
    BOX_KEY,
    CA_BUNDLE,
    CA_CERT,
    CA_KEY,
    CA_NEXT_CERT,
    CA_NEXT_KEY,
    PUBLIC_MODE,
    SECRET_MODE,
    SERVER_CERT,
    SERVER_KEY,
    SIGNING_ROOT,
    load_secrets,
)
from edge_agent.errors import FailedPrecondition, IntegrityError
from edge_agent.files import fsync_dir, replace_atomically, write_new
from edge_agent.trust import MAX_CAS, sign_root

RETIRED_CAS = "retired-cas"


@dataclass(frozen=True)
class CaSummary:
    issuing: str  # fingerprint of the CA that issues device certificates
    trusted: tuple[str, ...]  # fingerprints of the CAs whose certificates are accepted
    introduced: str  # fingerprint of ca-next ("" when no change is under way)
    root_version: int

    def to_json(self) -> dict[str, object]:
        return {
            "issuing": self.issuing,
            "trusted": list(self.trusted),
            "introduced": self.introduced,
            "signing_root_version": self.root_version,
        }


def describe(state_dir: Path) -> CaSummary:
    secrets = load_secrets(state_dir)
    trusted = x509.load_pem_x509_certificates(secrets.trusted_ca_pem)
    nxt = _next(state_dir)
    return CaSummary(
        issuing=secrets.ca.fingerprint,
        trusted=tuple(certificate_fingerprint(c) for c in trusted),
        introduced=nxt.fingerprint if nxt is not None else "",
        root_version=held_root(state_dir).version,
    )


def rotate(
    state_dir: Path, valid_for: dt.timedelta, now: dt.datetime, years: int = 10
) -> CaSummary:
    """Step 1: a new CA, trusted beside the current one (see the module's docstring)."""
    secrets = load_secrets(state_dir)
    held = held_root(state_dir)
    nxt = _next(state_dir)
    if nxt is None:
        (state_dir / CA_NEXT_KEY).unlink(missing_ok=True)  # a rotate cut short: start over
        if len(held.cas) > 1:
            raise FailedPrecondition(
                "the signing root trusts more than one CA: retire the old one first "
                "(autoglm cloud ca retire)"
            )
        nxt = CertificateAuthority.create(
            f"Open-AutoGLM Edge CA {now:%Y-%m-%d %H%M%S}", years=years
        )
        write_new(state_dir / CA_NEXT_KEY, key_pem(nxt.key), SECRET_MODE)
        write_new(state_dir / CA_NEXT_CERT, nxt.cert_pem, PUBLIC_MODE)
        fsync_dir(state_dir)
    cas = [*(held.cas or (secrets.ca.cert_pem,))]
    if nxt.cert_pem in cas:
        replace_atomically(state_dir / CA_BUNDLE, b"".join(cas), PUBLIC_MODE)  # (a crash)
        raise FailedPrecondition(
            "a CA change is under way already: `autoglm cloud ca activate` makes the new CA "
            "issue certificates"
        )
    if len(cas) >= MAX_CAS:
        raise FailedPrecondition(f"{len(cas)} CAs are trusted already; retire the old ones")
    _write_root(state_dir, held.version + 1, now + valid_for, held.keys, [*cas, nxt.cert_pem])
    replace_atomically(state_dir / CA_BUNDLE, b"".join([*cas, nxt.cert_pem]), PUBLIC_MODE)
    fsync_dir(state_dir)
    return describe(state_dir)


def activate(state_dir: Path, force: bool = False) -> CaSummary:
    """Step 2: the CA introduced by `rotate` issues from now on. Refused (unless `force`)
    while a device runs an agent that cannot follow a CA change: it would take the root
    without its CAs, and refuse the next certificate it renews (issued by the new CA)."""
    nxt = _next(state_dir)
    if nxt is None:
        raise FailedPrecondition("no CA was introduced: run `autoglm cloud ca rotate` first")
    if not force:
        _refuse_for(
            agents_without_ca_change(state_dir),
            "these devices run an agent that cannot follow a CA change (it reports no "
            "certificate issuer)",
            "upgrade their agents, or --force",
        )
    on_disk = x509.load_pem_x509_certificates((state_dir / CA_CERT).read_bytes())
    old = [c for c in on_disk if c != nxt.cert][:1]  # (none left: a rerun after the swap)
    new_ca_file = nxt.cert_pem + b"".join(_pem(c) for c in old)
    if _ca_on_disk(state_dir) is None and (state_dir / CA_KEY).read_bytes() == key_pem(nxt.key):
        # A crash between the key's and the certificate's swap below: finish it.
        replace_atomically(state_dir / CA_CERT, new_ca_file, PUBLIC_MODE)
    held = held_root(state_dir)
    if nxt.cert_pem not in held.cas:
        raise FailedPrecondition(
            f"{SIGNING_ROOT} does not list the introduced CA (an interrupted rotate?): run "
            "`autoglm cloud ca rotate` again"
        )
    # The secret box's key material first: webhook secrets stay readable under the new CA.
    if not (state_dir / BOX_KEY).exists():
        current = _ca_on_disk(state_dir)
        if current is None:
            raise IntegrityError(
                f"{state_dir}: {CA_KEY} and {CA_CERT} do not match and no {BOX_KEY} is kept"
            )
        replace_atomically(state_dir / BOX_KEY, current.key_material(), SECRET_MODE)
    retired = state_dir / RETIRED_CAS
    retired.mkdir(mode=0o700, exist_ok=True)
    if on_disk[0] != nxt.cert:
        stem = retired / f"ca-{certificate_fingerprint(on_disk[0])[:16]}"
        if not stem.with_suffix(".crt").exists():
            shutil.copy2(state_dir / CA_KEY, stem.with_suffix(".key"))
            shutil.copy2(state_dir / CA_CERT, stem.with_suffix(".crt"))
            fsync_dir(retired)
    # ca.crt: the issuing CA first, then the old one, so that tools which trust ca.crt go on
    # trusting the server certificate (the old CA's until retire).
    replace_atomically(state_dir / CA_KEY, key_pem(nxt.key), SECRET_MODE)
    replace_atomically(state_dir / CA_CERT, new_ca_file, PUBLIC_MODE)
    fsync_dir(state_dir)
    (state_dir / CA_NEXT_CERT).unlink()  # first: without it, ca-next.key is a leftover
    (state_dir / CA_NEXT_KEY).unlink()
    fsync_dir(state_dir)
    return describe(state_dir)


def retire(
    state_dir: Path, valid_for: dt.timedelta, now: dt.datetime, force: bool = False
) -> CaSummary:
    """Step 3: trust the issuing CA alone; it issues the server certificate too."""
    if _next(state_dir) is not None:
        raise FailedPrecondition(
            "a CA was introduced but does not issue yet: `autoglm cloud ca activate` first"
        )
    secrets = load_secrets(state_dir)
    held = held_root(state_dir)
    server = x509.load_pem_x509_certificates(secrets.server_chain_pem)[0]
    server_done = _issued(server, secrets.ca.cert)
    if len(held.cas) < 2 and server_done:
        raise FailedPrecondition("only the current CA is trusted; nothing to retire")
    if len(held.cas) >= 2 and not force:
        _refuse_for(
            devices_not_on(state_dir, secrets.ca.fingerprint),
            "these devices have not reported a certificate from the current CA and would be "
            "refused",
            "let them connect and renew, revoke them, or --force",
        )
    # The server certificate first: every device that passed the check above trusts both
    # CAs, so a plane restarted here serves it to devices that verify it. A root trusting the
    # new CA alone next to the old CA's server certificate would lock them out instead.
    if not server_done:
        server_key = new_private_key()
        server_cert = secrets.ca.issue_server_certificate(
            load_cloud_config(state_dir).hosts, server_key
        )
        chain = _pem(server_cert) + secrets.ca.cert_pem
        replace_atomically(state_dir / SERVER_KEY, key_pem(server_key), SECRET_MODE)
        replace_atomically(state_dir / SERVER_CERT, chain, PUBLIC_MODE)
        fsync_dir(state_dir)
    if len(held.cas) >= 2:
        _write_root(state_dir, held.version + 1, now + valid_for, held.keys, [secrets.ca.cert_pem])
    replace_atomically(state_dir / CA_BUNDLE, secrets.ca.cert_pem, PUBLIC_MODE)
    replace_atomically(state_dir / CA_CERT, secrets.ca.cert_pem, PUBLIC_MODE)
    fsync_dir(state_dir)
    return describe(state_dir)


def devices_not_on(state_dir: Path, issuer: str) -> list[str]:
    """Names of enrolled devices whose last reported certificate issuer is not `issuer`
    (or that never reported one: an agent too old to say, or never connected since)."""
    return sorted(
        f"{d.name} ({str((d.status or {}).get('certificate_issuer', ''))[:12] or 'unknown'})"
        for d in enrolled_devices(state_dir)
        if (d.status or {}).get("certificate_issuer", "") != issuer
    )


def agents_without_ca_change(state_dir: Path) -> list[str]:
    """Names of enrolled devices whose agent reported a status without a certificate issuer:
    too old to follow a CA change. Devices never heard from are not judged here (`retire`
    waits for them)."""
    return sorted(
        d.name
        for d in enrolled_devices(state_dir)
        if d.status and not d.status.get("certificate_issuer")
    )


def _refuse_for(names: list[str], what: str, way_out: str) -> None:
    if names:
        more = " ..." if len(names) > 10 else ""
        raise FailedPrecondition(f"{what}: {', '.join(names[:10])}{more} ({way_out})")


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_root(
    state_dir: Path,
    version: int,
    expires: dt.datetime,
    keys: list[ed25519.Ed25519PublicKey],
    cas: list[bytes],
) -> None:
    document = sign_root(version, expires, keys, root_signers(state_dir, keys), cas)
    replace_atomically(state_dir / SIGNING_ROOT, document, PUBLIC_MODE)
    fsync_dir(state_dir)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _next(state_dir: Path) -> CertificateAuthority | None:
    if not (state_dir / CA_NEXT_CERT).exists():
        return None
    return CertificateAuthority.load(
        (state_dir / CA_NEXT_KEY).read_bytes(), (state_dir / CA_NEXT_CERT).read_bytes()
    )


def _ca_on_disk(state_dir: Path) -> CertificateAuthority | None:
    try:
        return CertificateAuthority.load(
            (state_dir / CA_KEY).read_bytes(), (state_dir / CA_CERT).read_bytes()
        )
    except IntegrityError:
        return None
