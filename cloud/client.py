"""A synchronous operator client for the control plane's API (TLS + bearer token)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from edge_agent.errors import from_rpc_error
from protos.autoglm.v1 import operator_pb2, operator_pb2_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class Connection:
    """Where and how an operator reaches the control plane."""

    server: str
    ca_pem: bytes
    token: str
    tls_server_name: str = ""
    timeout_s: float = 30.0


class OperatorClient:
    """Thin wrapper over the OperatorService stub: adds the token, maps errors."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        options: list[tuple[str, Any]] = []
        if connection.tls_server_name:
            options.append(("grpc.ssl_target_name_override", connection.tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=connection.ca_pem)
        self._channel = grpc.secure_channel(connection.server, creds, options=options)
        self._stub = operator_pb2_grpc.OperatorServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {connection.token}"),)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, metadata=self._metadata, timeout=self.connection.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.connection.server) from None

    def register_device(
        self, request: operator_pb2.RegisterDeviceRequest
    ) -> operator_pb2.RegisterDeviceResponse:
        return self._call(self._stub.RegisterDevice, request)

    def issue_enrollment_token(
        self, device: str, token_ttl_seconds: int = 0
    ) -> operator_pb2.RegisterDeviceResponse:
        request = operator_pb2.IssueEnrollmentTokenRequest(
            device=device, token_ttl_seconds=token_ttl_seconds
        )
        return self._call(self._stub.IssueEnrollmentToken, request)

    def list_devices(self, selector: str = "") -> list[operator_pb2.Device]:
        response = self._call(
            self._stub.ListDevices, operator_pb2.ListDevicesRequest(selector=selector)
        )
        return list(response.devices)

    def get_device(self, device: str) -> operator_pb2.Device:
        return self._call(self._stub.GetDevice, operator_pb2.GetDeviceRequest(device=device))

    def label_device(
        self, device: str, set_labels: dict[str, str], remove: list[str]
    ) -> operator_pb2.Device:
        request = operator_pb2.LabelDeviceRequest(device=device, set=set_labels, remove=remove)
        return self._call(self._stub.LabelDevice, request)

    def revoke_device(self, device: str, reason: str) -> operator_pb2.Device:
        return self._call(
            self._stub.RevokeDevice, operator_pb2.RevokeDeviceRequest(device=device, reason=reason)
        )
