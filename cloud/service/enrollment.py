"""EnrollmentService: token + CSR in, certificate chain and pinned keys out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from grpc import aio

from cloud.devices import DeviceRegistry
from edge_agent.errors import PermissionDenied, RateLimited, Unauthenticated
from protos.autoglm.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)
MAX_FAILURES = 10  # failed enrollment attempts per peer address and window
WINDOW_S = 60.0


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:10.0.0.7:52344" -> "ipv4:10.0.0.7")."""
    if peer.startswith("ipv6:["):
        return peer.split("]", 1)[0] + "]"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class AttemptLimiter:
    """Failed token attempts per peer address in a fixed window: past `max_failures` the
    peer is refused until its window ends, so tokens cannot be guessed at line rate."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 100_000,
        what: str = "failed enrollment attempts",
    ) -> None:
        self.what = what
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self.max_peers = max_peers
        self._failures: dict[str, tuple[float, int]] = {}  # peer -> (window start, count)

    def check(self, peer: str) -> None:
        start, count = self._failures.get(peer, (0.0, 0))
        left = start + self.window_s - self.clock()
        if count >= self.max_failures and left > 0:
            raise RateLimited(f"{count} {self.what} from {peer}; try again in {left:.0f} s")

    def took_back(self, peer: str) -> None:
        """An attempt counted before its answer (`failed` first) turned out to succeed."""
        start, count = self._failures.get(peer, (0.0, 0))
        if count > 0:
            self._failures[peer] = (start, count - 1)

    def failed(self, peer: str) -> None:
        now = self.clock()
        start, count = self._failures.get(peer, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if len(self._failures) >= self.max_peers:  # memory stays bounded under a spray
            self._failures = {p: v for p, v in self._failures.items() if now - v[0] < self.window_s}
        self._failures[peer] = (start, count + 1)


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(
        self,
        registry: DeviceRegistry,
        ca_pem: bytes,
        signing_public_pem: bytes,
        endpoints: Callable[[], common_pb2.Endpoints],
        attempts: AttemptLimiter | None = None,
    ) -> None:
        self.registry = registry
        self.ca_pem = ca_pem
        self.signing_public_pem = signing_public_pem
        self.endpoints = endpoints
        self.attempts = attempts or AttemptLimiter()

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        peer = peer_host(context.peer())
        self.attempts.check(peer)
        try:
            enrollment = await asyncio.to_thread(
                self.registry.enroll, request.token, request.csr_pem, request.device_name
            )
        except (Unauthenticated, PermissionDenied):
            self.attempts.failed(peer)  # a wrong, used or expired token: a guess, maybe
            raise
        log.info("device %s (%s) enrolled", enrollment.device.name, enrollment.device.id)
        return enrollment_pb2.EnrollResponse(
            device_id=enrollment.device.id,
            device_name=enrollment.device.name,
            certificate_chain_pem=enrollment.certificate.chain_pem,
            ca_certificate_pem=self.ca_pem,
            signing_public_key_pem=self.signing_public_pem,
            endpoints=self.endpoints(),
        )
