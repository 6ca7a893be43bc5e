"""`autoglm-edge enroll`: bootstrap file in, device identity on disk out."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from edge_agent import __version__, hostfacts
from edge_agent.bootstrap import Bootstrap
from edge_agent.errors import FailedPrecondition, IntegrityError, from_rpc_error
from edge_agent.identity import (
    IdentityInfo,
    build_csr,
    check_issued_certificate,
    ensure_writable,
    new_device_key,
    save_identity,
)
from protos.autoglm.v1 import enrollment_pb2, enrollment_pb2_grpc

ENROLL_TIMEOUT_S = 30.0


def channel_options(tls_server_name: str) -> list[tuple[str, Any]]:
    # No BDP probing: a PING per burst on each session costs more than small messages gain
    # (see the server's options in cloud/service/server.py).
    options: list[tuple[str, Any]] = [("grpc.http2.bdp_probe", 0)]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def enroll(
    bootstrap: Bootstrap, state_dir: Path, now: dt.datetime | None = None, name: str = ""
) -> IdentityInfo:
    """Generates the device key here, has the control plane sign a CSR, stores the identity.
    With a group's bootstrap the device enrolls as `name` (default: this host's name)."""
    now = now or dt.datetime.now(dt.UTC)
    if bootstrap.group:
        name = (name or socket.gethostname()).strip()
    elif name and name != bootstrap.device_name:
        raise FailedPrecondition(
            f"the bootstrap is for device '{bootstrap.device_name}', not '{name}' "
            "(--name is for a group's bootstrap)"
        )
    if bootstrap.expires_at.astimezone(dt.UTC) <= now:
        raise FailedPrecondition(
            f"the bootstrap's enrollment token expired at {bootstrap.expires_at.isoformat()}; "
            "ask an operator for a new one"
        )
    ensure_writable(state_dir)
    key = new_device_key()
    request = enrollment_pb2.EnrollRequest(
        token=bootstrap.token,
        csr_pem=build_csr(key, name if bootstrap.group else bootstrap.device_id),
        agent_version=__version__,
        host=hostfacts.collect(state_dir),
        device_name=name if bootstrap.group else "",
    )
    ca_pem = bootstrap.ca_certificate.encode()
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(
        bootstrap.api_address, creds, options=channel_options(bootstrap.tls_server_name)
    ) as channel:
        try:
            response = enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                request, timeout=ENROLL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, bootstrap.api_address) from None
    if bootstrap.group and response.device_name != name:
        raise IntegrityError(
            f"the control plane enrolled device '{response.device_name}', this one asked to "
            f"be '{name}'"
        )
    if not bootstrap.group and response.device_id != bootstrap.device_id:
        raise IntegrityError(
            f"the control plane enrolled device '{response.device_id}', the bootstrap names "
            f"'{bootstrap.device_id}'"
        )
    # The control plane's CAs as it serves them, over the channel the bootstrap's CA
    # authenticated: during a CA change both, so a bootstrap made before the change still
    # enrolls under the new CA (its token is spent by now).
    ca_pem = served_cas(bytes(response.ca_certificate_pem)) or ca_pem
    check_issued_certificate(key, response.certificate_chain_pem, ca_pem)
    if not response.signing_public_key_pem:
        raise IntegrityError("the control plane sent no bundle-signing key to pin")
    info = IdentityInfo(
        device_id=response.device_id,
        device_name=response.device_name,
        api_address=bootstrap.api_address,
        device_address=response.endpoints.device_address or bootstrap.device_address,
        tls_server_name=bootstrap.tls_server_name,
        enrolled_at=now,
    )
    save_identity(
        state_dir,
        key,
        bytes(response.certificate_chain_pem),
        ca_pem,
        bytes(response.signing_public_key_pem),
        info,
    )
    return info


def served_cas(pem: bytes) -> bytes:
    """`pem` when it holds 1 to 4 CA certificates, else b"" (keep the bootstrap's)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return b""
    for cert in certs:
        try:
            if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return b""
        except x509.ExtensionNotFound:
            return b""
    return pem if 1 <= len(certs) <= 4 else b""
