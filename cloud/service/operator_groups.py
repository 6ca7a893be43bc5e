"""The enrollment-group calls of OperatorService (a mixin of OperatorServicer): one token
that factory images carry enrolls up to N devices, each under the name it gives."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from grpc import aio

from cloud.devices import DeviceRegistry
from cloud.domain import EnrollmentGroup
from cloud.service.serde import timestamp
from protos.autoglm.v1 import common_pb2, operator_pb2

log = logging.getLogger(__name__)
DEFAULT_GROUP_TTL = dt.timedelta(days=30)


def group_to_proto(group: EnrollmentGroup) -> operator_pb2.EnrollmentGroup:
    msg = operator_pb2.EnrollmentGroup(
        name=group.name,
        labels=dict(group.labels),
        profile=group.profile,
        max_uses=group.max_uses,
        uses=group.uses,
    )
    for field in ("created_at", "expires_at", "revoked_at"):
        ts = timestamp(getattr(group, field))
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg


class GroupCalls:
    registry: DeviceRegistry
    ca_pem: bytes
    endpoints: Callable[[], common_pb2.Endpoints]

    async def CreateEnrollmentGroup(
        self,
        request: operator_pb2.CreateEnrollmentGroupRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.CreateEnrollmentGroupResponse:
        ttl = dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        group, token = await asyncio.to_thread(
            self.registry.create_group,
            request.name,
            dict(request.labels),
            request.profile,
            request.max_uses,
            ttl or DEFAULT_GROUP_TTL,
        )
        log.info("enrollment group %s created for %d device(s)", group.name, group.max_uses)
        return operator_pb2.CreateEnrollmentGroupResponse(
            group=group_to_proto(group),
            enrollment_token=token,
            endpoints=self.endpoints(),
            ca_certificate_pem=self.ca_pem,
        )

    async def ListEnrollmentGroups(
        self,
        request: operator_pb2.ListEnrollmentGroupsRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.ListEnrollmentGroupsResponse:
        groups = await asyncio.to_thread(self.registry.store.list_enrollment_groups)
        return operator_pb2.ListEnrollmentGroupsResponse(groups=[group_to_proto(g) for g in groups])

    async def RevokeEnrollmentGroup(
        self,
        request: operator_pb2.RevokeEnrollmentGroupRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.EnrollmentGroup:
        group = await asyncio.to_thread(
            self.registry.store.revoke_enrollment_group, request.name.strip(), self.registry.clock()
        )
        log.info("enrollment group %s revoked", group.name)
        return group_to_proto(group)
