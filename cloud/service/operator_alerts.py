"""The alert, webhook and prediction calls of OperatorService (a mixin of OperatorServicer)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from cloud.alerts import AlertFeed
from cloud.clock import Clock
from cloud.devices import DeviceRegistry
from cloud.domain import AlertFilter, AlertRecord
from cloud.service.guard import current_operator
from cloud.service.serde import (
    ALERT_STATE_OF,
    alert_to_proto,
    prediction_to_proto,
    webhook_to_proto,
)
from cloud.webhooks import SecretBox, check_url, redacted
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

log = logging.getLogger(__name__)
MAX_LIST = 10_000
MIN_SECRET = 16
MAX_PREDICTIONS = 100_000


class AlertCalls:
    registry: DeviceRegistry
    alerts: AlertFeed
    clock: Clock
    secret_box: SecretBox | None

    def _names(self) -> dict[str, str]:
        return {d.id: d.name for d in self.registry.list({})}

    def _filter(self, state: int, device: str, since: Any, has_since: bool) -> AlertFilter:
        device_id = self.registry.get(device).id if device else ""
        return AlertFilter(
            state=ALERT_STATE_OF.get(state),  # type: ignore[call-overload]
            device_id=device_id,
            since=since.ToDatetime(tzinfo=dt.UTC) if has_since else None,
        )

    def _protos(self, alerts: list[AlertRecord]) -> list[operator_pb2.Alert]:
        if len(alerts) == 1:  # one device lookup, not the whole fleet's names
            names = {alerts[0].device_id: self.registry.get(alerts[0].device_id).name}
        else:
            names = self._names() if alerts else {}
        return [alert_to_proto(a, names.get(a.device_id, a.device_id)) for a in alerts]

    async def ListAlerts(
        self, request: operator_pb2.ListAlertsRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListAlertsResponse:
        def run() -> list[operator_pb2.Alert]:
            where = self._filter(
                request.state, request.device, request.since, request.HasField("since")
            )
            limit = min(request.limit or 100, MAX_LIST)
            return self._protos(self.registry.store.list_alerts(where, limit))

        return operator_pb2.ListAlertsResponse(alerts=await asyncio.to_thread(run))

    async def GetAlert(
        self, request: operator_pb2.GetAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        def run() -> operator_pb2.Alert:
            return self._protos([self.registry.store.get_alert(request.id)])[0]

        return await asyncio.to_thread(run)

    async def AckAlert(
        self, request: operator_pb2.AckAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        return await self._update(request.id, "ack", request.note)

    async def ResolveAlert(
        self, request: operator_pb2.ResolveAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        return await self._update(request.id, "resolve", request.note)

    async def _update(self, alert_id: str, action: str, note: str) -> operator_pb2.Alert:
        by = current_operator.get() or "operator"

        def run() -> operator_pb2.Alert:
            updated = self.registry.store.update_alert(alert_id, action, note, by, self.clock())
            return self._protos([updated])[0]

        alert = await asyncio.to_thread(run)
        self.alerts.notify()
        return alert

    async def WatchAlerts(
        self, request: operator_pb2.WatchAlertsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[operator_pb2.Alert]:
        where = await asyncio.to_thread(self._filter, request.state, request.device, None, False)
        names = await asyncio.to_thread(self._names)
        if request.HasField("after_revision"):
            after = request.after_revision
        else:
            after = await asyncio.to_thread(self.registry.store.alert_revision)
        yield operator_pb2.Alert(revision=after)  # the marker: where this stream starts
        async for alert in self.alerts.follow(where, after):
            if alert.device_id not in names:  # registered since the watch began
                names = await asyncio.to_thread(self._names)
            yield alert_to_proto(alert, names.get(alert.device_id, alert.device_id))

    async def QueryPredictions(
        self,
        request: operator_pb2.QueryPredictionsRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> operator_pb2.QueryPredictionsResponse:
        if not request.device:
            raise InvalidInput("QueryPredictions needs a device (id or name)")

        def run() -> operator_pb2.QueryPredictionsResponse:
            device = self.registry.get(request.device)
            since = request.since.ToDatetime(tzinfo=dt.UTC) if request.HasField("since") else None
            limit = min(request.limit or 1000, MAX_PREDICTIONS)
            rows = self.registry.store.list_predictions(device.id, request.asset, since, limit)
            return operator_pb2.QueryPredictionsResponse(
                predictions=[prediction_to_proto(p) for p in rows]
            )

        return await asyncio.to_thread(run)

    # ---- webhooks ----
    async def AddWebhook(
        self, request: operator_pb2.AddWebhookRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Webhook:
        url = check_url(request.url)
        if len(request.secret) < MIN_SECRET:
            raise InvalidInput(
                f"a webhook secret must have at least {MIN_SECRET} characters (it signs every "
                "delivery; receivers check it)"
            )
        secret = self.secret_box.seal(request.secret) if self.secret_box else request.secret
        hook = await asyncio.to_thread(
            self.registry.store.add_webhook, url, secret, request.filter, self.clock()
        )
        log.info("webhook %s added: %s (filter %r)", hook.id, redacted(hook.url), hook.filter)
        return webhook_to_proto(hook)

    async def ListWebhooks(
        self, request: operator_pb2.ListWebhooksRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListWebhooksResponse:
        hooks = await asyncio.to_thread(self.registry.store.list_webhooks)
        return operator_pb2.ListWebhooksResponse(webhooks=[webhook_to_proto(h) for h in hooks])

    async def RemoveWebhook(
        self, request: operator_pb2.RemoveWebhookRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Webhook:
        hook = await asyncio.to_thread(self.registry.store.remove_webhook, request.id)
        log.info("webhook %s removed: %s", hook.id, hook.url)
        return webhook_to_proto(hook)
