"""The operator and audit calls of OperatorService (a mixin of OperatorServicer): admins add,
list and revoke operators with roles, and read the audit log the guard writes."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from grpc import aio

from cloud.clock import Clock
from cloud.devices import checked_name
from cloud.domain import AuditEntry, OperatorRecord
from cloud.service.roles import check_role
from cloud.service.serde import timestamp
from cloud.store import Store
from cloud.tokens import OPERATOR_PREFIX, hash_token, new_token
from protos.autoglm.v1 import operator_pb2

log = logging.getLogger(__name__)
MAX_AUDIT = 10_000


def operator_to_proto(record: OperatorRecord) -> operator_pb2.Operator:
    msg = operator_pb2.Operator(id=record.id, name=record.name, role=record.role)
    for field, value in (("created_at", record.created_at), ("revoked_at", record.revoked_at)):
        ts = timestamp(value)
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg


def audit_to_proto(entry: AuditEntry) -> operator_pb2.AuditEntry:
    msg = operator_pb2.AuditEntry(
        id=entry.id, operator=entry.operator, role=entry.role, method=entry.method,
        target=entry.target, code=entry.code, detail=entry.detail,
    )  # fmt: skip
    msg.at.FromDatetime(entry.at)
    return msg


class AdminCalls:
    clock: Clock

    @property
    def _store(self) -> Store:
        return self.registry.store  # type: ignore[attr-defined,no-any-return]

    async def AddOperator(
        self, request: operator_pb2.AddOperatorRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.AddOperatorResponse:
        name = checked_name("operator", request.name)
        role = check_role(request.role or "viewer")
        token = new_token(OPERATOR_PREFIX)
        record = await asyncio.to_thread(
            self._store.add_operator, name, hash_token(token), self.clock(), role
        )
        log.info("operator %s added with role %s", name, role)
        return operator_pb2.AddOperatorResponse(operator=operator_to_proto(record), token=token)

    async def ListOperators(
        self, request: operator_pb2.ListOperatorsRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListOperatorsResponse:
        records = await asyncio.to_thread(self._store.list_operators)
        return operator_pb2.ListOperatorsResponse(operators=[operator_to_proto(r) for r in records])

    async def RevokeOperator(
        self, request: operator_pb2.RevokeOperatorRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Operator:
        record = await asyncio.to_thread(
            self._store.revoke_operator, request.name.strip(), self.clock()
        )
        log.info("operator %s revoked", record.name)
        return operator_to_proto(record)

    async def ListAudit(
        self, request: operator_pb2.ListAuditRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListAuditResponse:
        since: dt.datetime | None = None
        if request.HasField("since"):
            since = request.since.ToDatetime(tzinfo=dt.UTC)
        limit = min(request.limit or 100, MAX_AUDIT)
        entries = await asyncio.to_thread(
            self._store.list_audit, since, request.operator.strip(), limit
        )
        return operator_pb2.ListAuditResponse(entries=[audit_to_proto(e) for e in entries])
