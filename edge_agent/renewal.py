"""Certificate renewal: the device's identity never expires by surprise.

At `cloud.renew_at` of its certificate's life the agent makes a new key and CSR, the control
plane signs it over mutual TLS with the current certificate (`RenewCertificate`), and the
agent swaps its credentials without restarting: its session reconnects with the new ones.
The old certificate keeps working for the control plane's grace period, so a renewal whose
answer was lost is simply tried again. Offline, renewal retries with the agent's backoff.

The new key and certificate replace the old ones on disk crash-safely: both are written
(and synced) as `*.next` first, then renamed over the old files one after the other;
`finish_interrupted` completes or discards a swap a crash interrupted, before the identity is
read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from edge_agent.enroll import channel_options
from edge_agent.errors import AutoglmError, IntegrityError, LocalStateError, from_rpc_error
from edge_agent.files import fsync_dir
from edge_agent.identity import (
    CERT_FILE,
    KEY_FILE,
    DeviceIdentity,
    build_csr,
    check_issued_certificate,
    identity_dir,
    load_identity,
    new_device_key,
)
from edge_agent.retry import Backoff
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
NEXT = ".next"


def validity(identity: DeviceIdentity) -> tuple[dt.datetime, dt.datetime]:
    leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


def renewal_due(identity: DeviceIdentity, at_fraction: float) -> dt.datetime:
    """When the certificate is `at_fraction` through its life (may be in the past)."""
    start, end = validity(identity)
    return start + (end - start) * at_fraction


def _matches(key_pem: bytes, chain_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except (ValueError, IndexError, TypeError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    )


def finish_interrupted(state_dir: Path) -> None:
    """Completes a credential swap a crash interrupted (or drops one that was not fully
    written): the identity on disk is always a matching key and certificate."""
    folder = identity_dir(state_dir)
    key_next, cert_next = folder / (KEY_FILE + NEXT), folder / (CERT_FILE + NEXT)
    if not key_next.exists() and not cert_next.exists():
        return
    try:
        if key_next.exists():  # the key was not renamed yet: both .next files decide
            if cert_next.exists() and _matches(key_next.read_bytes(), cert_next.read_bytes()):
                os.replace(key_next, folder / KEY_FILE)
            else:
                key_next.unlink(missing_ok=True)
                cert_next.unlink(missing_ok=True)
                log.warning("an unfinished certificate renewal was discarded; it runs again")
                return
        if cert_next.exists():
            os.replace(cert_next, folder / CERT_FILE)
        fsync_dir(folder)
        log.info("finished a certificate renewal a restart interrupted")
    except OSError as exc:
        raise LocalStateError(f"{folder}: cannot finish a certificate renewal: {exc}") from None


def save_renewed(state_dir: Path, key_pem: bytes, chain_pem: bytes) -> None:
    folder = identity_dir(state_dir)
    key_next, cert_next = folder / (KEY_FILE + NEXT), folder / (CERT_FILE + NEXT)
    try:
        for path, data, mode in ((key_next, key_pem, 0o600), (cert_next, chain_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(folder)
    except OSError as exc:
        key_next.unlink(missing_ok=True)
        cert_next.unlink(missing_ok=True)
        raise LocalStateError(f"{folder}: cannot write the renewed certificate: {exc}") from None
    finish_interrupted(state_dir)


class CertificateRenewer:
    """Renews the certificate when due; `on_renewed(identity)` hands the new credentials on."""

    def __init__(
        self,
        state_dir: Path,
        identity: Callable[[], DeviceIdentity],
        on_renewed: Callable[[DeviceIdentity], None],
        address: str,
        tls_server_name: str,
        at_fraction: float,
        backoff: Backoff,
        check_every_s: float = 60.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self.on_renewed = on_renewed
        self.address = address
        self.tls_server_name = tls_server_name
        self.at_fraction = at_fraction
        self.backoff = backoff
        self.check_every_s = check_every_s
        self.clock = clock
        self.renewals = 0
        self.last_error = ""
        self._asked = asyncio.Event()  # the control plane asked for a renewal (a CA change)

    def renew_soon(self) -> None:
        """Renew now, whatever the certificate's age (event loop only)."""
        self._asked.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait = self.check_every_s
            now = self.clock()  # once per check (tests move it)
            due = renewal_due(self.identity(), self.at_fraction)
            # Short-lived certificates: never sleep past the due time by a check interval.
            wait = min(wait, max(1.0, (due - now).total_seconds()))
            if now >= due or self._asked.is_set():
                try:
                    await self.renew()
                    self._asked.clear()
                    self.backoff.reset()
                except AutoglmError as exc:
                    self.last_error = str(exc)
                    wait = self.backoff.next_delay()
                    log.warning("certificate renewal failed (%s); again in %.0f s", exc, wait)
                    await self._sleep(stop, wait, asked=False)  # a repeated ask waits too
                    continue
            await self._sleep(stop, wait, asked=True)

    async def _sleep(self, stop: asyncio.Event, seconds: float, asked: bool) -> None:
        """Until `stop`, `seconds` pass, or (with `asked`) a renewal is asked for."""
        waits = [asyncio.ensure_future(stop.wait())]
        if asked:
            waits.append(asyncio.ensure_future(self._asked.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def renew(self) -> DeviceIdentity:
        current = self.identity()
        key = new_device_key()
        request = agent_pb2.RenewCertificateRequest(csr_pem=build_csr(key, current.info.device_id))
        options = channel_options(self.tls_server_name)
        try:
            async with aio.secure_channel(
                self.address, current.credentials(), options=options
            ) as channel:
                response = await agent_pb2_grpc.AgentServiceStub(channel).RenewCertificate(
                    request, timeout=30
                )
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.address) from None
        chain = bytes(response.certificate_chain_pem)
        check_issued_certificate(key, chain, current.ca_pem)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        await asyncio.to_thread(save_renewed, self.state_dir, key_pem, chain)
        renewed = load_identity(self.state_dir)
        if renewed.chain_pem != chain:
            raise IntegrityError("the renewed certificate did not land on disk")
        self.renewals += 1
        start, end = validity(renewed)
        log.info("certificate renewed: valid %s .. %s", f"{start:%Y-%m-%d %H:%M}Z",
                 f"{end:%Y-%m-%d %H:%M}Z")  # fmt: skip
        self.on_renewed(renewed)
        return renewed
