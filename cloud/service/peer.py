"""Who is calling: the device named by a verified client certificate."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from grpc import aio

from cloud.pki import DEVICE_URI_PREFIX
from edge_agent.errors import Unauthenticated


@functools.lru_cache(maxsize=65_536)
def _identity_from_pem(pem: bytes) -> tuple[str, str]:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Unauthenticated("the client certificate names no device") from None
    uris = [
        u
        for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(DEVICE_URI_PREFIX)
    ]
    if len(uris) != 1:
        raise Unauthenticated("the client certificate names no device")
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return uris[0][len(DEVICE_URI_PREFIX) :], fingerprint


@functools.lru_cache(maxsize=65_536)
def _not_after_from_pem(pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def certificate_not_after(context: aio.ServicerContext[Any, Any]) -> dt.datetime | None:
    """When the caller's client certificate expires (None without one)."""
    pems = list(context.auth_context().get("x509_pem_cert") or ())
    return _not_after_from_pem(bytes(pems[0])) if pems else None


def device_identity(context: aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    """(device id, certificate fingerprint) of the caller. gRPC verified the chain already:
    the device port requires a client certificate signed by the control plane's CA."""
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or ())
    if not pems:
        raise Unauthenticated(
            "device calls need mutual TLS with the device's certificate, on the device port"
        )
    return _identity_from_pem(bytes(pems[0]))


@functools.lru_cache(maxsize=65_536)
def _issued_by(pem: bytes, ca_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_pem)
        )
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issued_by(context: aio.ServicerContext[Any, Any], ca_pem: bytes) -> bool:
    """Whether the caller's client certificate was issued by the CA `ca_pem` (after a CA
    change, the older certificates were not: their devices are asked to renew)."""
    pems = list(context.auth_context().get("x509_pem_cert") or ())
    return bool(pems) and _issued_by(bytes(pems[0]), ca_pem)
