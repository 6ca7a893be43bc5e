"""The operator API as the console's signed-in operator: every call carries their token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from cloud.client import older_predictions
from edge_agent.errors import from_rpc_error
from protos.autoglm.v1 import agent_pb2, operator_pb2, operator_pb2_grpc

T = TypeVar("T")
CALL_TIMEOUT_S = 15.0


class OperatorApi:
    """One TLS channel to the control plane's API port, shared by every signed-in browser."""

    def __init__(self, target: str, ca_pem: bytes, server_name: str = "") -> None:
        options: list[tuple[str, Any]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self.target = target
        self._channel = aio.secure_channel(target, creds, options=options)
        self._stub = operator_pb2_grpc.OperatorServiceStub(self._channel)

    def as_operator(self, token: str) -> OperatorCalls:
        return OperatorCalls(self._stub, token, self.target)

    async def close(self) -> None:
        await self._channel.close()


class OperatorCalls:
    """The calls the console makes, as one operator; failures raise the project's errors
    (PermissionDenied, Unauthenticated, NotFound, ...), as the CLI's client does."""

    def __init__(
        self, stub: operator_pb2_grpc.OperatorServiceAsyncStub, token: str, target: str
    ) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._target = target

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._target) from None

    async def check(self) -> None:
        """Raises Unauthenticated unless the token is a live operator's (any role)."""
        await self._call(self._stub.ListAlerts, operator_pb2.ListAlertsRequest(limit=1))

    async def list_devices(self, selector: str = "") -> list[operator_pb2.Device]:
        request = operator_pb2.ListDevicesRequest(selector=selector)
        return list((await self._call(self._stub.ListDevices, request)).devices)

    async def get_device(self, device: str) -> operator_pb2.Device:
        return await self._call(self._stub.GetDevice, operator_pb2.GetDeviceRequest(device=device))

    async def predictions(
        self, request: operator_pb2.QueryPredictionsRequest
    ) -> list[agent_pb2.Prediction]:
        """Oldest first, the older parts of an answer cut to the server's size budget too."""
        parts: list[list[agent_pb2.Prediction]] = []
        following: operator_pb2.QueryPredictionsRequest | None = request
        while following is not None:
            response = await self._call(self._stub.QueryPredictions, following)
            parts.append(list(response.predictions))
            following = older_predictions(request, response, sum(map(len, parts)))
        return [p for part in reversed(parts) for p in part]

    async def list_rollouts(self, active_only: bool = False) -> list[operator_pb2.Rollout]:
        request = operator_pb2.ListRolloutsRequest(active_only=active_only)
        return list((await self._call(self._stub.ListRollouts, request)).rollouts)

    async def get_rollout(self, rollout_id: str) -> operator_pb2.Rollout:
        request = operator_pb2.GetRolloutRequest(id=rollout_id)
        return await self._call(self._stub.GetRollout, request)

    async def rollout_action(self, action: str, rollout_id: str, reason: str) -> None:
        method = {
            "pause": self._stub.PauseRollout,
            "resume": self._stub.ResumeRollout,
            "abort": self._stub.AbortRollout,
        }[action]
        await self._call(method, operator_pb2.RolloutActionRequest(id=rollout_id, reason=reason))

    async def list_alerts(
        self, request: operator_pb2.ListAlertsRequest
    ) -> list[operator_pb2.Alert]:
        return list((await self._call(self._stub.ListAlerts, request)).alerts)

    async def get_alert(self, alert_id: str) -> operator_pb2.Alert:
        return await self._call(self._stub.GetAlert, operator_pb2.GetAlertRequest(id=alert_id))

    async def ack_alert(self, alert_id: str, note: str, verdict: str, fault_type: str) -> None:
        request = operator_pb2.AckAlertRequest(
            id=alert_id, note=note, verdict=verdict, fault_type=fault_type
        )
        await self._call(self._stub.AckAlert, request)

    async def resolve_alert(self, alert_id: str, note: str, verdict: str, fault_type: str) -> None:
        request = operator_pb2.ResolveAlertRequest(
            id=alert_id, note=note, verdict=verdict, fault_type=fault_type
        )
        await self._call(self._stub.ResolveAlert, request)

    async def shelve_alert(self, alert_id: str, duration_s: int, reason: str) -> None:
        request = operator_pb2.ShelveAlertRequest(id=alert_id, duration_s=duration_s, reason=reason)
        await self._call(self._stub.ShelveAlert, request)

    async def unshelve_alert(self, alert_id: str) -> None:
        await self._call(self._stub.UnshelveAlert, operator_pb2.GetAlertRequest(id=alert_id))

    async def captures(
        self, request: operator_pb2.ListCapturesRequest
    ) -> AsyncIterator[operator_pb2.CapturedWindow]:
        """Captured windows, oldest first, page by page; stopping early ends the stream."""
        call = self._stub.ListCaptures(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        try:
            async for page in call:
                for window in page.windows:
                    yield window
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._target) from None
        finally:
            call.cancel()

    async def watch_alerts(self) -> AsyncIterator[operator_pb2.Alert]:
        """Alerts as they change, from now on, until the caller stops (or the stream ends).
        The first is the stream's marker (no id): from then on no change is missed."""
        call = self._stub.WatchAlerts(operator_pb2.WatchAlertsRequest(), metadata=self._metadata)
        try:
            async for alert in call:
                yield alert
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._target) from None
        finally:
            call.cancel()
