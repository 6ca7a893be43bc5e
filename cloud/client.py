"""A synchronous operator client for the control plane's API (TLS + bearer token)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import grpc

from edge_agent.errors import IntegrityError, InvalidInput, Unavailable, from_rpc_error
from protos.autoglm.v1 import agent_pb2, operator_pb2, operator_pb2_grpc

T = TypeVar("T")
PUSH_CHUNK = 1 << 20
DEFAULT_PREDICTIONS = 1000  # what QueryPredictions answers for a limit of 0 (operator.proto)
MAX_PREDICTIONS = 100_000  # the most QueryPredictions answers over all parts (operator.proto)


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

    def create_enrollment_group(
        self, request: operator_pb2.CreateEnrollmentGroupRequest
    ) -> operator_pb2.CreateEnrollmentGroupResponse:
        return self._call(self._stub.CreateEnrollmentGroup, request)

    def list_enrollment_groups(self) -> list[operator_pb2.EnrollmentGroup]:
        request = operator_pb2.ListEnrollmentGroupsRequest()
        return list(self._call(self._stub.ListEnrollmentGroups, request).groups)

    def revoke_enrollment_group(self, name: str) -> operator_pb2.EnrollmentGroup:
        request = operator_pb2.RevokeEnrollmentGroupRequest(name=name)
        return self._call(self._stub.RevokeEnrollmentGroup, request)

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

    def delete_device(self, device: str) -> operator_pb2.Device:
        return self._call(self._stub.DeleteDevice, operator_pb2.DeleteDeviceRequest(device=device))

    # ---- models ----
    def push_bundle(
        self, directory: Path, progress: Callable[[int, int], None] | None = None
    ) -> operator_pb2.Model:
        """Streams the bundle's manifest, signature and every file it lists (1 MiB chunks)."""
        from edge_agent.bundle import (  # pydantic and cryptography: only when pushing
            MANIFEST,
            SIGNATURE,
            bundle_paths,
            parse_manifest,
            sha256_file,
        )

        try:
            raw = (directory / MANIFEST).read_bytes()
        except OSError as exc:
            raise InvalidInput(
                f"{directory}: not a bundle ({MANIFEST}: {exc.strerror}); `autoglm model train` "
                "writes one"
            ) from None
        manifest = parse_manifest(raw, str(directory / MANIFEST))
        names = [MANIFEST, SIGNATURE, *sorted(bundle_paths(manifest))]
        sizes = {}
        for name in names:
            path = directory / name
            if not path.is_file():
                raise InvalidInput(f"{directory}: {name} is missing; not a complete bundle")
            sizes[name] = path.stat().st_size
        total = sum(sizes.values())

        def chunks() -> Iterator[operator_pb2.PushBundleChunk]:
            sent = 0
            for name in names:
                path = directory / name
                yield operator_pb2.PushBundleChunk(
                    file=operator_pb2.BundleFileHeader(
                        path=name, size=sizes[name], digest="sha256:" + sha256_file(path)
                    )
                )
                with path.open("rb") as fh:
                    while block := fh.read(PUSH_CHUNK):
                        yield operator_pb2.PushBundleChunk(data=block)
                        sent += len(block)
                        if progress is not None:
                            progress(sent, total)

        try:
            return self._stub.PushBundle(
                chunks(), metadata=self._metadata, timeout=max(self.connection.timeout_s, 600)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.connection.server) from None

    def pull_bundle(self, name: str, version: str, directory: Path) -> Path:
        """Writes every file of a pushed bundle under `directory` (created; must not exist).
        The caller verifies it (`read_own_bundle`): the control plane checked it at push."""
        directory.mkdir(parents=True)
        request = operator_pb2.GetModelRequest(name=name, version=version)
        out = None
        try:
            for chunk in self._stub.PullBundle(
                request, metadata=self._metadata, timeout=max(self.connection.timeout_s, 600)
            ):
                if chunk.WhichOneof("body") == "file":
                    if out is not None:
                        out.close()
                    rel = PurePosixPath(chunk.file.path)
                    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
                        raise IntegrityError(f"the bundle names a file {chunk.file.path!r}")
                    target = directory / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    out = target.open("wb")
                elif out is not None:
                    out.write(chunk.data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.connection.server) from None
        finally:
            if out is not None:
                out.close()
        return directory

    def list_captures(
        self, request: operator_pb2.ListCapturesRequest
    ) -> Iterator[operator_pb2.CapturedWindow]:
        """Every captured window the request selects, page by page as the stream brings them."""
        try:
            for page in self._stub.ListCaptures(
                request, metadata=self._metadata, timeout=max(self.connection.timeout_s, 600)
            ):
                yield from page.windows
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self.connection.server) from None

    def list_models(self, name: str = "") -> list[operator_pb2.Model]:
        response = self._call(self._stub.ListModels, operator_pb2.ListModelsRequest(name=name))
        return list(response.models)

    def delete_model(self, name: str, version: str) -> operator_pb2.Model:
        return self._call(
            self._stub.DeleteModel, operator_pb2.GetModelRequest(name=name, version=version)
        )

    def get_model(self, name: str, version: str) -> operator_pb2.Model:
        return self._call(
            self._stub.GetModel, operator_pb2.GetModelRequest(name=name, version=version)
        )

    # ---- rollouts ----
    def create_rollout(self, request: operator_pb2.CreateRolloutRequest) -> operator_pb2.Rollout:
        return self._call(self._stub.CreateRollout, request)

    def get_rollout(self, rollout_id: str) -> operator_pb2.Rollout:
        return self._call(self._stub.GetRollout, operator_pb2.GetRolloutRequest(id=rollout_id))

    def list_rollouts(self, active_only: bool = False) -> list[operator_pb2.Rollout]:
        response = self._call(
            self._stub.ListRollouts, operator_pb2.ListRolloutsRequest(active_only=active_only)
        )
        return list(response.rollouts)

    def rollout_action(
        self, action: str, rollout_id: str, reason: str = ""
    ) -> operator_pb2.Rollout:
        """`action`: pause, resume, abort or undo."""
        method = {
            "pause": self._stub.PauseRollout,
            "resume": self._stub.ResumeRollout,
            "abort": self._stub.AbortRollout,
            "undo": self._stub.UndoRollout,
        }[action]
        return self._call(method, operator_pb2.RolloutActionRequest(id=rollout_id, reason=reason))

    # ---- alerts and predictions ----
    def list_alerts(self, request: operator_pb2.ListAlertsRequest) -> list[operator_pb2.Alert]:
        return list(self._call(self._stub.ListAlerts, request).alerts)

    def get_alert(self, alert_id: str) -> operator_pb2.Alert:
        return self._call(self._stub.GetAlert, operator_pb2.GetAlertRequest(id=alert_id))

    def alert_action(
        self, action: str, alert_id: str, note: str = "", verdict: str = "", fault_type: str = ""
    ) -> operator_pb2.Alert:
        """`action`: ack or resolve; `verdict` "", true, false or unsure."""
        if action == "ack":
            ack = operator_pb2.AckAlertRequest(
                id=alert_id, note=note, verdict=verdict, fault_type=fault_type
            )
            return self._call(self._stub.AckAlert, ack)
        resolve = operator_pb2.ResolveAlertRequest(
            id=alert_id, note=note, verdict=verdict, fault_type=fault_type
        )
        return self._call(self._stub.ResolveAlert, resolve)

    def shelve_alert(self, alert_id: str, duration_s: float, reason: str) -> operator_pb2.Alert:
        request = operator_pb2.ShelveAlertRequest(
            id=alert_id, duration_s=max(0, min(int(duration_s), 2**32 - 1)), reason=reason
        )
        return self._call(self._stub.ShelveAlert, request)

    def unshelve_alert(self, alert_id: str) -> operator_pb2.Alert:
        return self._call(self._stub.UnshelveAlert, operator_pb2.GetAlertRequest(id=alert_id))

    # ---- maintenance windows ----
    def add_maintenance(
        self,
        selector: str,
        reason: str,
        asset: str = "",
        starts_at: dt.datetime | None = None,
        ends_at: dt.datetime | None = None,
    ) -> operator_pb2.MaintenanceWindow:
        request = operator_pb2.AddMaintenanceRequest(selector=selector, asset=asset, reason=reason)
        if starts_at is not None:
            request.starts_at.FromDatetime(starts_at)
        if ends_at is not None:
            request.ends_at.FromDatetime(ends_at)
        return self._call(self._stub.AddMaintenance, request)

    def list_maintenance(self, include_ended: bool = False) -> list[operator_pb2.MaintenanceWindow]:
        request = operator_pb2.ListMaintenanceRequest(include_ended=include_ended)
        return list(self._call(self._stub.ListMaintenance, request).windows)

    def remove_maintenance(self, window_id: str) -> operator_pb2.MaintenanceWindow:
        request = operator_pb2.RemoveMaintenanceRequest(id=window_id)
        return self._call(self._stub.RemoveMaintenance, request)

    def watch_alerts(
        self, request: operator_pb2.WatchAlertsRequest, resume: bool = True
    ) -> Iterator[operator_pb2.Alert]:
        """Alerts as they change, until the caller stops iterating. With `resume`, a lost
        stream (control plane restarting, network) is reopened after the last revision seen,
        so nothing is missed or repeated; other errors are raised."""
        wanted = operator_pb2.WatchAlertsRequest()
        wanted.CopyFrom(request)  # the caller's request is not changed
        delay = 0.5
        while True:
            try:
                for alert in self._stub.WatchAlerts(wanted, metadata=self._metadata):
                    wanted.after_revision = alert.revision
                    delay = 0.5
                    if alert.id:  # not the stream's marker
                        yield alert
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, self.connection.server)
                if not resume or not isinstance(error, Unavailable):
                    raise error from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def query_predictions(
        self, request: operator_pb2.QueryPredictionsRequest
    ) -> list[agent_pb2.Prediction]:
        """Every prediction the request asks for, oldest first: an answer the server cut to
        its size budget is followed by calls for the older parts."""
        parts: list[list[agent_pb2.Prediction]] = []
        following: operator_pb2.QueryPredictionsRequest | None = request
        while following is not None:
            response = self._call(self._stub.QueryPredictions, following)
            parts.append(list(response.predictions))
            following = older_predictions(request, response, sum(map(len, parts)))
        return [p for part in reversed(parts) for p in part]

    # ---- webhooks ----
    def add_webhook(
        self, url: str, secret: str, filter_text: str = "", kind: str = ""
    ) -> operator_pb2.Webhook:
        request = operator_pb2.AddWebhookRequest(
            url=url, secret=secret, filter=filter_text, kind=kind
        )
        return self._call(self._stub.AddWebhook, request)

    def rotate_webhook_secret(
        self, webhook_id: str, secret: str, overlap_s: int | None = None
    ) -> operator_pb2.Webhook:
        """`overlap_s`: how long the previous secret keeps signing (None: 24 h; 0: not)."""
        request = operator_pb2.RotateWebhookSecretRequest(id=webhook_id, secret=secret)
        if overlap_s is not None:
            request.overlap_s = overlap_s
        return self._call(self._stub.RotateWebhookSecret, request)

    def list_webhooks(self) -> list[operator_pb2.Webhook]:
        return list(
            self._call(self._stub.ListWebhooks, operator_pb2.ListWebhooksRequest()).webhooks
        )

    def add_operator(self, name: str, role: str) -> operator_pb2.AddOperatorResponse:
        request = operator_pb2.AddOperatorRequest(name=name, role=role)
        return self._call(self._stub.AddOperator, request)

    def list_operators(self) -> list[operator_pb2.Operator]:
        request = operator_pb2.ListOperatorsRequest()
        return list(self._call(self._stub.ListOperators, request).operators)

    def revoke_operator(self, name: str) -> operator_pb2.Operator:
        request = operator_pb2.RevokeOperatorRequest(name=name)
        return self._call(self._stub.RevokeOperator, request)

    def list_audit(
        self, since: dt.datetime | None = None, operator: str = "", limit: int = 100
    ) -> list[operator_pb2.AuditEntry]:
        request = operator_pb2.ListAuditRequest(operator=operator, limit=limit)
        if since is not None:
            request.since.FromDatetime(since)
        return list(self._call(self._stub.ListAudit, request).entries)

    def remove_webhook(self, webhook_id: str) -> operator_pb2.Webhook:
        return self._call(
            self._stub.RemoveWebhook, operator_pb2.RemoveWebhookRequest(id=webhook_id)
        )


def older_predictions(
    request: operator_pb2.QueryPredictionsRequest,
    response: operator_pb2.QueryPredictionsResponse,
    got: int,
) -> operator_pb2.QueryPredictionsRequest | None:
    """The call for the next older part of what `request` asks for, after `response` and
    `got` predictions in all; None when the answers are complete."""
    left = min(request.limit or DEFAULT_PREDICTIONS, MAX_PREDICTIONS) - got
    if not response.next_before_sequence or left <= 0:
        return None
    older = operator_pb2.QueryPredictionsRequest()
    older.CopyFrom(request)
    older.before_sequence = response.next_before_sequence
    older.limit = left
    return older
