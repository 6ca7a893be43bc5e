"""The delivery calls of OperatorService (a mixin of OperatorServicer): webhook targets and
their secrets, and maintenance windows."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from grpc import aio

from cloud.clock import Clock
from cloud.devices import DeviceRegistry
from cloud.maintenance import check_window
from cloud.service.guard import current_operator
from cloud.service.serde import maintenance_to_proto, webhook_to_proto
from cloud.webhook_kinds import KINDS, PAGERDUTY_URL, check_secret
from cloud.webhook_records import WebhookRecord
from cloud.webhooks import SecretBox, check_url, redacted
from edge_agent.errors import InvalidInput, NotFound
from protos.autoglm.v1 import operator_pb2

log = logging.getLogger(__name__)
DEFAULT_OVERLAP_S = 86_400
MAX_OVERLAP_S = 30 * 86_400


class DeliveryCalls:
    registry: DeviceRegistry
    clock: Clock
    secret_box: SecretBox | None
    maintenance_changed: Callable[[], None]

    def _seal(self, secret: str) -> str:
        return self.secret_box.seal(secret) if self.secret_box and secret else secret

    # ---- webhooks ----
    async def AddWebhook(
        self, request: operator_pb2.AddWebhookRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Webhook:
        kind = request.kind or "standard"
        if kind not in KINDS:
            raise InvalidInput(f"webhook kind {kind!r} is not one of {', '.join(KINDS)}")
        url = check_url(request.url or (PAGERDUTY_URL if kind == "pagerduty" else ""))
        secret = self._seal(check_secret(kind, request.secret))
        hook = await asyncio.to_thread(
            self.registry.store.add_webhook, url, secret, request.filter, self.clock(), kind
        )
        log.info(
            "%s webhook %s added: %s (filter %r)", kind, hook.id, redacted(hook.url), hook.filter
        )
        return webhook_to_proto(hook)

    async def RotateWebhookSecret(
        self,
        request: operator_pb2.RotateWebhookSecretRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.Webhook:
        overlap = request.overlap_s if request.HasField("overlap_s") else DEFAULT_OVERLAP_S
        if overlap > MAX_OVERLAP_S:
            raise InvalidInput(f"--overlap is at most 30 days, got {overlap} s")

        def rotate() -> operator_pb2.Webhook:
            hook = self._webhook(request.id)
            if hook.kind != "standard":
                raise InvalidInput(
                    f"webhook {hook.id} is a {hook.kind} target: only standard webhooks sign; "
                    "remove it and add it again with the new key"
                )
            secret = self._seal(check_secret(hook.kind, request.secret))
            until = self.clock() + dt.timedelta(seconds=overlap)
            return webhook_to_proto(
                self.registry.store.rotate_webhook_secret(hook.id, secret, until)
            )

        hook = await asyncio.to_thread(rotate)
        log.info("webhook %s: secret rotated, the previous one signs for %d s", hook.id, overlap)
        return hook

    def _webhook(self, webhook_id: str) -> WebhookRecord:
        """The webhook with this id, or the one whose id starts with it (as lists show)."""
        hooks = self.registry.store.list_webhooks()
        exact = [h for h in hooks if h.id == webhook_id]
        found = exact or [h for h in hooks if len(webhook_id) >= 4 and h.id.startswith(webhook_id)]
        if len(found) != 1:
            raise NotFound(f"no webhook with id '{webhook_id}'")
        return found[0]

    async def ListWebhooks(
        self, request: operator_pb2.ListWebhooksRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListWebhooksResponse:
        hooks = await asyncio.to_thread(self.registry.store.list_webhooks)
        return operator_pb2.ListWebhooksResponse(webhooks=[webhook_to_proto(h) for h in hooks])

    async def RemoveWebhook(
        self, request: operator_pb2.RemoveWebhookRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Webhook:
        hook = await asyncio.to_thread(self.registry.store.remove_webhook, request.id)
        log.info("webhook %s removed: %s", hook.id, redacted(hook.url))
        return webhook_to_proto(hook)

    # ---- maintenance windows ----
    async def AddMaintenance(
        self, request: operator_pb2.AddMaintenanceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.MaintenanceWindow:
        by = current_operator.get() or "operator"

        def add() -> operator_pb2.MaintenanceWindow:
            now = self.clock()
            starts = (
                request.starts_at.ToDatetime(tzinfo=dt.UTC)
                if request.HasField("starts_at")
                else now
            )
            ends = (
                request.ends_at.ToDatetime(tzinfo=dt.UTC) if request.HasField("ends_at") else None
            )
            check_window(request.selector, request.asset, starts, ends, request.reason, now)
            window = self.registry.store.add_maintenance(
                request.selector, request.asset, starts, ends, request.reason, by, now
            )
            return maintenance_to_proto(window)

        window = await asyncio.to_thread(add)
        log.info("maintenance %s added by %s: %s", window.id, by, window.selector)
        self.maintenance_changed()
        return window

    async def ListMaintenance(
        self, request: operator_pb2.ListMaintenanceRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListMaintenanceResponse:
        windows = await asyncio.to_thread(
            self.registry.store.list_maintenance, self.clock(), request.include_ended
        )
        return operator_pb2.ListMaintenanceResponse(
            windows=[maintenance_to_proto(w) for w in windows]
        )

    async def RemoveMaintenance(
        self,
        request: operator_pb2.RemoveMaintenanceRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.MaintenanceWindow:
        window = await asyncio.to_thread(self.registry.store.remove_maintenance, request.id)
        log.info("maintenance %s removed", window.id)
        self.maintenance_changed()
        return maintenance_to_proto(window)
