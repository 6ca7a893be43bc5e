"""EnrollmentService: token + CSR in, certificate chain and pinned keys out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from grpc import aio

from cloud.devices import DeviceRegistry
from protos.autoglm.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(
        self,
        registry: DeviceRegistry,
        ca_pem: bytes,
        signing_public_pem: bytes,
        endpoints: Callable[[], common_pb2.Endpoints],
    ) -> None:
        self.registry = registry
        self.ca_pem = ca_pem
        self.signing_public_pem = signing_public_pem
        self.endpoints = endpoints

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        enrollment = await asyncio.to_thread(self.registry.enroll, request.token, request.csr_pem)
        log.info("device %s (%s) enrolled", enrollment.device.name, enrollment.device.id)
        return enrollment_pb2.EnrollResponse(
            device_id=enrollment.device.id,
            device_name=enrollment.device.name,
            certificate_chain_pem=enrollment.certificate.chain_pem,
            ca_certificate_pem=self.ca_pem,
            signing_public_key_pem=self.signing_public_pem,
            endpoints=self.endpoints(),
        )
