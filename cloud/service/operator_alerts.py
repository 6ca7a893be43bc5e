"""The alert and prediction calls of OperatorService (a mixin of OperatorServicer)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from grpc import aio

from cloud.alerts import AlertFeed
from cloud.clock import Clock
from cloud.devices import DeviceRegistry
from cloud.domain import VERDICTS, AlertFilter, AlertRecord, DeviceRecord, PredictionRecord
from cloud.service.guard import current_operator
from cloud.service.serde import ALERT_STATE_OF, alert_to_proto, prediction_to_proto
from cloud.severity import SeverityRule, severity
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)
MAX_LIST = 10_000
MAX_PREDICTIONS = 100_000
# A QueryPredictions answer stops before this many bytes: clients receive at most 4 MiB a
# message by default (gRPC's default), and one window of a device with 256 sensors is ~36 KB.
PREDICTIONS_BUDGET = 3 << 20
# Predictions read at once for an answer: first this many (windows of 20 sensors fill the
# budget at ~4,300, of 256 sensors at ~87), then as many as seem to fit, at most the second.
PREDICTIONS_CHUNK = 100
MAX_PREDICTIONS_CHUNK = 5000
MAX_SEQUENCE = 2**63 - 1  # the store's sequences are signed 64-bit
# WatchAlerts streams one operator may hold open on one replica at once (the console's own
# limits per browser session and per operator are lower).
MAX_WATCHES_PER_OPERATOR = 32


class AlertCalls:
    registry: DeviceRegistry
    alerts: AlertFeed
    clock: Clock
    severity_rules: Sequence[SeverityRule]
    max_shelve_s: float

    def _devices(self) -> dict[str, DeviceRecord]:
        return {d.id: d for d in self.registry.list({})}

    def _filter(
        self, state: int, device: str, since: Any, has_since: bool, verdict: str = ""
    ) -> AlertFilter:
        device_id = self.registry.get(device).id if device else ""
        if verdict and verdict != "none" and verdict not in VERDICTS:
            raise InvalidInput(f"--verdict {verdict!r} is not one of {', '.join(VERDICTS)}, none")
        return AlertFilter(
            state=ALERT_STATE_OF.get(state),  # type: ignore[call-overload]
            device_id=device_id,
            since=since.ToDatetime(tzinfo=dt.UTC) if has_since else None,
            verdict=None if not verdict else "" if verdict == "none" else verdict,
        )

    def _proto(self, alert: AlertRecord, device: DeviceRecord | None) -> operator_pb2.Alert:
        labels = device.labels if device is not None else {}
        level = severity(alert.peak_score, labels, alert.model_version, self.severity_rules)
        name = device.name if device is not None else alert.device_id
        return alert_to_proto(alert, name, level)

    def _protos(self, alerts: list[AlertRecord]) -> list[operator_pb2.Alert]:
        if len(alerts) == 1:  # one device lookup, not the whole fleet's
            devices = {alerts[0].device_id: self.registry.get(alerts[0].device_id)}
        else:
            devices = self._devices() if alerts else {}
        return [self._proto(a, devices.get(a.device_id)) for a in alerts]

    async def ListAlerts(
        self, request: operator_pb2.ListAlertsRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.ListAlertsResponse:
        def run() -> list[operator_pb2.Alert]:
            where = self._filter(
                request.state,
                request.device,
                request.since,
                request.HasField("since"),
                request.verdict,
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
        by = current_operator.get() or "operator"
        return await self._change(
            lambda: self.registry.store.update_alert(
                request.id, "ack", request.note, by, self.clock(), request.verdict,
                request.fault_type,
            )
        )  # fmt: skip

    async def ResolveAlert(
        self, request: operator_pb2.ResolveAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        by = current_operator.get() or "operator"
        return await self._change(
            lambda: self.registry.store.update_alert(
                request.id, "resolve", request.note, by, self.clock(), request.verdict,
                request.fault_type,
            )
        )  # fmt: skip

    async def ShelveAlert(
        self, request: operator_pb2.ShelveAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        by = current_operator.get() or "operator"
        if not 0 < request.duration_s <= self.max_shelve_s:
            raise InvalidInput(
                f"shelving lasts more than 0 s and at most {self.max_shelve_s:.0f} s "
                f"(max_shelve_s), got {request.duration_s} s"
            )

        def shelve() -> AlertRecord:
            now = self.clock()
            until = now + dt.timedelta(seconds=request.duration_s)
            return self.registry.store.shelve_alert(request.id, until, request.reason, by, now)

        return await self._change(shelve)

    async def UnshelveAlert(
        self, request: operator_pb2.GetAlertRequest, context: aio.ServicerContext[Any, Any]
    ) -> operator_pb2.Alert:
        by = current_operator.get() or "operator"
        return await self._change(
            lambda: self.registry.store.unshelve_alert(request.id, by, self.clock())
        )

    async def _change(self, change: Callable[[], AlertRecord]) -> operator_pb2.Alert:
        def run() -> operator_pb2.Alert:
            return self._protos([change()])[0]

        alert = await asyncio.to_thread(run)
        self.alerts.notify()
        return alert

    async def WatchAlerts(
        self, request: operator_pb2.WatchAlertsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[operator_pb2.Alert]:
        who = current_operator.get() or "operator"
        with self.alerts.watching(who, MAX_WATCHES_PER_OPERATOR, "MAX_WATCHES_PER_OPERATOR"):
            where = await asyncio.to_thread(
                self._filter, request.state, request.device, None, False
            )
            devices = await asyncio.to_thread(self._devices)
            if request.HasField("after_revision"):
                after = request.after_revision
            else:
                after = await asyncio.to_thread(self.registry.store.alert_revision)
            yield operator_pb2.Alert(revision=after)  # the marker: where this stream starts
            async for alert in self.alerts.follow(where, after):
                if alert.device_id not in devices:  # registered since the watch began
                    devices = await asyncio.to_thread(self._devices)
                yield self._proto(alert, devices.get(alert.device_id))

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
            until = request.until.ToDatetime(tzinfo=dt.UTC) if request.HasField("until") else None
            if since is not None and until is not None and until < since:
                raise InvalidInput("QueryPredictions: until is before since")
            limit = min(request.limit or 1000, MAX_PREDICTIONS)
            before = min(request.before_sequence, MAX_SEQUENCE)

            def older(count: int, below: int) -> list[PredictionRecord]:
                return self.registry.store.list_predictions(
                    device.id, request.asset, since, count, until, below
                )

            return _fitting(older, limit, before, PREDICTIONS_BUDGET)

        return await asyncio.to_thread(run)


def _fitting(
    older: Callable[[int, int], list[PredictionRecord]], limit: int, before: int, budget: int
) -> operator_pb2.QueryPredictionsResponse:
    """The newest `limit` predictions below sequence `before` (0: any) that fit a message of
    `budget` bytes, at least one, oldest first; when older ones are left out, where the next
    older part starts. Read newest first in chunks (`older(count, below)` answers the newest
    `count` below `below`, oldest first) sized by what still fits, so a page costs about its
    own rows, not the `limit` (up to MAX_PREDICTIONS) the store would otherwise build."""
    kept: list[agent_pb2.Prediction] = []
    size = 0
    while len(kept) < limit:
        count = min(limit - len(kept), _chunk(len(kept), size, budget))
        rows = older(count, before)
        for row in reversed(rows):
            message = prediction_to_proto(row)
            size += message.ByteSize() + 6  # with the field's tag and length
            if size > budget and kept:
                kept.reverse()
                return operator_pb2.QueryPredictionsResponse(
                    predictions=kept, next_before_sequence=before
                )
            kept.append(message)
            before = row.sequence
        if len(rows) < count:  # no older ones
            break
    kept.reverse()
    return operator_pb2.QueryPredictionsResponse(predictions=kept)


def _chunk(kept: int, size: int, budget: int) -> int:
    """Rows to read next: PREDICTIONS_CHUNK first, then about as many as the room left holds
    at the size seen so far, and one more to learn whether the page is full."""
    if not kept:
        return PREDICTIONS_CHUNK
    return min(MAX_PREDICTIONS_CHUNK, (budget - size) * kept // max(size, 1) + 1)
