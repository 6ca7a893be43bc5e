"""OperatorService: device calls; models, rollouts and alerts answer UNIMPLEMENTED until served."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from grpc import aio

from cloud.clock import Clock, utc_now
from cloud.devices import DeviceRegistry, Registration
from cloud.domain import DeviceRecord, parse_selector
from cloud.service.serde import device_to_proto, timestamp
from cloud.service.sessions import SessionHub
from edge_agent.errors import InvalidInput, PermissionDenied
from protos.autoglm.v1 import common_pb2, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)
MAX_TOKEN_TTL_S = 30 * 86_400


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        registry: DeviceRegistry,
        hub: SessionHub,
        offline_after: dt.timedelta,
        ca_pem: bytes,
        endpoints: Callable[[], common_pb2.Endpoints],
        clock: Clock = utc_now,
    ) -> None:
        self.registry = registry
        self.hub = hub
        self.offline_after = offline_after
        self.ca_pem = ca_pem
        self.endpoints = endpoints
        self.clock = clock

    def _device(self, device: DeviceRecord) -> operator_pb2.Device:
        return device_to_proto(device, online=device.is_online(self.clock(), self.offline_after))

    async def RegisterDevice(
        self, request: operator_pb2.RegisterDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.RegisterDeviceResponse:
        ttl = _token_ttl(request.token_ttl_seconds)
        registration = await asyncio.to_thread(
            self.registry.register, request.name, dict(request.labels), request.profile, ttl
        )
        log.info("device %s registered", registration.device.name)
        return self._registration(registration)

    async def IssueEnrollmentToken(
        self,
        request: operator_pb2.IssueEnrollmentTokenRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.RegisterDeviceResponse:
        ttl = _token_ttl(request.token_ttl_seconds)
        registration = await asyncio.to_thread(
            self.registry.new_enrollment_token, request.device, ttl
        )
        log.info("new enrollment token for device %s", registration.device.name)
        return self._registration(registration)

    def _registration(self, registration: Registration) -> operator_pb2.RegisterDeviceResponse:
        return operator_pb2.RegisterDeviceResponse(
            device=self._device(registration.device),
            enrollment_token=registration.token,
            token_expires_at=timestamp(registration.expires_at),
            endpoints=self.endpoints(),
            ca_certificate_pem=self.ca_pem,
        )

    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListDevicesResponse:
        devices = await asyncio.to_thread(self.registry.list, parse_selector(request.selector))
        return operator_pb2.ListDevicesResponse(devices=[self._device(d) for d in devices])

    async def GetDevice(
        self, request: operator_pb2.GetDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        return self._device(await asyncio.to_thread(self.registry.get, request.device))

    async def LabelDevice(
        self, request: operator_pb2.LabelDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        device = await asyncio.to_thread(
            self.registry.label, request.device, dict(request.set), list(request.remove)
        )
        return self._device(device)

    async def RevokeDevice(
        self, request: operator_pb2.RevokeDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        device = await asyncio.to_thread(self.registry.revoke, request.device, request.reason)
        self.hub.end_device(device.id, PermissionDenied(f"device '{device.name}' was revoked"))
        log.info("device %s revoked: %s", device.name, request.reason or "(no reason)")
        return self._device(device)


def _token_ttl(seconds: int) -> dt.timedelta | None:
    if seconds > MAX_TOKEN_TTL_S:
        raise InvalidInput(f"token_ttl_seconds may be at most {MAX_TOKEN_TTL_S} (30 days)")
    return dt.timedelta(seconds=seconds) if seconds else None
