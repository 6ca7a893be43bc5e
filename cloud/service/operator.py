"""OperatorService: devices, models, rollouts, alerts and predictions."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from grpc import aio

from cloud.alerts import AlertFeed
from cloud.catalog import ModelCatalog
from cloud.clock import Clock, utc_now
from cloud.devices import DeviceRegistry, Registration
from cloud.domain import DesiredModel, DeviceRecord, Gates
from cloud.rollout_rules import waiting_for
from cloud.rollouts import RolloutController
from cloud.selectors import parse_selector
from cloud.service.operator_admin import AdminCalls
from cloud.service.operator_alerts import AlertCalls
from cloud.service.operator_captures import CaptureCalls
from cloud.service.operator_delivery import DeliveryCalls
from cloud.service.operator_groups import GroupCalls
from cloud.service.serde import (
    bundle_chunks,
    device_to_proto,
    model_to_proto,
    rollout_to_proto,
    timestamp,
)
from cloud.service.sessions import SessionHub
from cloud.severity import SeverityRule
from cloud.webhooks import SecretBox
from edge_agent.errors import InvalidInput, PermissionDenied
from protos.autoglm.v1 import common_pb2, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)
MAX_TOKEN_TTL_S = 30 * 86_400


class OperatorServicer(
    AlertCalls,
    GroupCalls,
    CaptureCalls,
    DeliveryCalls,
    AdminCalls,
    operator_pb2_grpc.OperatorServiceServicer,
):
    def __init__(
        self,
        registry: DeviceRegistry,
        hub: SessionHub,
        offline_after: dt.timedelta,
        ca_pem: bytes,
        endpoints: Callable[[], common_pb2.Endpoints],
        catalog: ModelCatalog,
        rollouts: RolloutController,
        push_desired: Callable[[Sequence[DesiredModel]], None],
        alerts: AlertFeed,
        clock: Clock = utc_now,
        secret_box: SecretBox | None = None,
        severity_rules: Sequence[SeverityRule] = (),
        max_shelve_s: float = 7 * 86_400.0,
        maintenance_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.alerts = alerts
        self.secret_box = secret_box
        self.severity_rules = severity_rules
        self.max_shelve_s = max_shelve_s
        self.maintenance_changed = maintenance_changed
        self.catalog = catalog
        self.rollouts = rollouts
        self.push_desired = push_desired
        self.registry = registry
        self.hub = hub
        self.offline_after = offline_after
        self.ca_pem = ca_pem
        self.endpoints = endpoints
        self.clock = clock

    def _device(self, device: DeviceRecord) -> operator_pb2.Device:
        """A device without its desired model (one just registered, or deleted, has none)."""
        return device_to_proto(device, online=device.is_online(self.clock(), self.offline_after))

    def _with_desired(self, devices: Sequence[DeviceRecord]) -> list[operator_pb2.Device]:
        """Devices with the models the control plane wants on them, read in one go (blocks:
        call it in a thread)."""
        desired = self.registry.store.desired_for([d.id for d in devices])
        now = self.clock()
        return [
            device_to_proto(d, d.is_online(now, self.offline_after), desired.get(d.id))
            for d in devices
        ]

    def _one_with_desired(self, device: DeviceRecord) -> operator_pb2.Device:
        return self._with_desired([device])[0]

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
        # An existing device (re-enrolled): it may have a desired model.
        device = await asyncio.to_thread(self._one_with_desired, registration.device)
        return self._registration(registration, device)

    def _registration(
        self, registration: Registration, device: operator_pb2.Device | None = None
    ) -> operator_pb2.RegisterDeviceResponse:
        return operator_pb2.RegisterDeviceResponse(
            device=device or self._device(registration.device),
            enrollment_token=registration.token,
            token_expires_at=timestamp(registration.expires_at),
            endpoints=self.endpoints(),
            ca_certificate_pem=self.ca_pem,
        )

    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListDevicesResponse:
        selector = parse_selector(request.selector)

        def load() -> list[operator_pb2.Device]:
            return self._with_desired(self.registry.list(selector))

        return operator_pb2.ListDevicesResponse(devices=await asyncio.to_thread(load))

    async def GetDevice(
        self, request: operator_pb2.GetDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        def load() -> operator_pb2.Device:
            return self._one_with_desired(self.registry.get(request.device))

        return await asyncio.to_thread(load)

    async def LabelDevice(
        self, request: operator_pb2.LabelDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        device = await asyncio.to_thread(
            self.registry.label, request.device, dict(request.set), list(request.remove)
        )
        return await asyncio.to_thread(self._one_with_desired, device)

    async def RevokeDevice(
        self, request: operator_pb2.RevokeDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        device = await asyncio.to_thread(self.registry.revoke, request.device, request.reason)
        self.hub.end_device(device.id, PermissionDenied(f"device '{device.name}' was revoked"))
        log.info("device %s revoked: %s", device.name, request.reason or "(no reason)")
        return await asyncio.to_thread(self._one_with_desired, device)

    async def DeleteDevice(
        self, request: operator_pb2.DeleteDeviceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Device:
        device = await asyncio.to_thread(self.registry.store.delete_device, request.device)
        self.hub.end_device(device.id, PermissionDenied(f"device '{device.name}' was deleted"))
        log.info("device %s (%s) deleted", device.name, device.id)
        return self._device(device)

    # ---- models ----
    async def PushBundle(
        self,
        request_iterator: AsyncIterator[operator_pb2.PushBundleChunk],
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.Model:
        record = await self.catalog.receive(bundle_chunks(request_iterator))
        log.info("model %s:%s pushed (%d bytes)", record.name, record.version, record.size_bytes)
        return await asyncio.to_thread(model_to_proto, record, self.catalog.artifacts)

    async def ListModels(
        self, request: operator_pb2.ListModelsRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListModelsResponse:
        records = await asyncio.to_thread(self.registry.store.list_models, request.name)
        return operator_pb2.ListModelsResponse(
            models=[model_to_proto(r, self.catalog.artifacts) for r in records]
        )

    async def GetModel(
        self, request: operator_pb2.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Model:
        record = await asyncio.to_thread(
            self.registry.store.get_model, request.name, request.version
        )
        return model_to_proto(record, self.catalog.artifacts)

    async def DeleteModel(
        self, request: operator_pb2.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Model:
        record = await asyncio.to_thread(
            self.registry.store.delete_model, request.name, request.version
        )
        log.info("model %s:%s deleted", record.name, record.version)
        return model_to_proto(record, self.catalog.artifacts)

    # ---- rollouts ----
    async def CreateRollout(
        self, request: operator_pb2.CreateRolloutRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        gates = _gates(request)
        rollout, desired = await asyncio.to_thread(
            self.rollouts.create,
            request.model_name,
            request.model_version,
            request.selector,
            list(request.waves),
            float(request.soak_seconds),
            gates,
        )
        self.push_desired(desired)
        return await self._rollout(rollout.id)

    async def GetRollout(
        self, request: operator_pb2.GetRolloutRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        return await self._rollout(request.id)

    async def ListRollouts(
        self, request: operator_pb2.ListRolloutsRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListRolloutsResponse:
        records = await asyncio.to_thread(self.registry.store.list_rollouts, request.active_only)
        return operator_pb2.ListRolloutsResponse(
            rollouts=[await self._rollout(r.id, with_devices=False) for r in records]
        )

    async def PauseRollout(
        self, request: operator_pb2.RolloutActionRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        await asyncio.to_thread(self.rollouts.pause, request.id, request.reason)
        return await self._rollout(request.id)

    async def ResumeRollout(
        self, request: operator_pb2.RolloutActionRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        _, desired = await asyncio.to_thread(self.rollouts.resume, request.id)
        self.push_desired(desired)
        return await self._rollout(request.id)

    async def AbortRollout(
        self, request: operator_pb2.RolloutActionRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        _, desired = await asyncio.to_thread(self.rollouts.abort, request.id, request.reason)
        self.push_desired(desired)
        return await self._rollout(request.id)

    async def UndoRollout(
        self, request: operator_pb2.RolloutActionRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Rollout:
        _, desired = await asyncio.to_thread(self.rollouts.undo, request.id, request.reason)
        self.push_desired(desired)
        return await self._rollout(request.id)

    async def _rollout(self, rollout_id: str, with_devices: bool = True) -> operator_pb2.Rollout:
        store = self.registry.store

        def load() -> operator_pb2.Rollout:
            rollout = store.get_rollout(rollout_id)
            targets = store.rollout_targets(rollout_id)
            names = {d.id: d.name for d in store.list_devices({})} if with_devices else {}
            waits = waiting_for(rollout, targets, names, self.clock(), self.rollouts.settings)
            return rollout_to_proto(rollout, targets, names, with_devices, waits)

        return await asyncio.to_thread(load)


def _gates(request: operator_pb2.CreateRolloutRequest) -> Gates:
    """The request's gates; zero fields (not given) take the defaults."""
    defaults = Gates()
    g = request.gates
    return Gates(
        max_failure_fraction=g.max_failure_fraction or defaults.max_failure_fraction,
        min_shadow_agreement=g.min_shadow_agreement or defaults.min_shadow_agreement,
        max_alert_rate_difference=g.max_alert_rate_difference or defaults.max_alert_rate_difference,
        max_latency_regression=g.max_latency_regression or defaults.max_latency_regression,
        min_shadow_windows=g.min_shadow_windows or defaults.min_shadow_windows,
    )


def _token_ttl(seconds: int) -> dt.timedelta | None:
    if seconds > MAX_TOKEN_TTL_S:
        raise InvalidInput(f"token_ttl_seconds may be at most {MAX_TOKEN_TTL_S} (30 days)")
    return dt.timedelta(seconds=seconds) if seconds else None
