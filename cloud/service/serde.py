"""Conversions between protobuf messages and the control plane's domain types (one place)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from cloud.artifacts import PREFIX as ARTIFACT_PREFIX
from cloud.artifacts import ArtifactStore
from cloud.captures import CaptureLabel, CaptureRecord
from cloud.catalog import BundleFile
from cloud.domain import (
    AlertRecord,
    AlertState,
    DesiredModel,
    DeviceRecord,
    DeviceState,
    InstallOutcome,
    InstallReport,
    ModelRecord,
    PredictionRecord,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    ShadowReport,
    TargetState,
)
from cloud.maintenance import MaintenanceWindow
from cloud.service.records import calibration_to_proto
from cloud.webhook_records import WebhookRecord
from edge_agent.bootstrap import Bootstrap
from edge_agent.bundle import Manifest
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2, common_pb2, operator_pb2

_DEVICE_STATE = {
    DeviceState.PENDING: operator_pb2.Device.STATE_PENDING,
    DeviceState.ACTIVE: operator_pb2.Device.STATE_ACTIVE,
    DeviceState.REVOKED: operator_pb2.Device.STATE_REVOKED,
}
DEVICE_STATE_FROM_PROTO = {v: k for k, v in _DEVICE_STATE.items()}


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(dt.UTC))
    return ts


def from_timestamp(ts: Timestamp, present: bool) -> dt.datetime | None:
    return ts.ToDatetime(tzinfo=dt.UTC) if present else None


def message_to_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as a JSON-able dict (how the store keeps reported status)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def status_from_dict(data: dict[str, Any]) -> agent_pb2.AgentStatus:
    return json_format.ParseDict(data, agent_pb2.AgentStatus(), ignore_unknown_fields=True)


def host_from_dict(data: dict[str, Any]) -> common_pb2.HostFacts:
    return json_format.ParseDict(data, common_pb2.HostFacts(), ignore_unknown_fields=True)


def device_to_proto(
    device: DeviceRecord, online: bool, desired: DesiredModel | None = None
) -> operator_pb2.Device:
    """The API's device; `desired` is the model the control plane wants on it (None: none)."""
    msg = operator_pb2.Device(
        id=device.id,
        name=device.name,
        labels=device.labels,
        profile=device.profile,
        state=_DEVICE_STATE[device.state],
        online=online,
        agent_version=device.agent_version,
        status=status_from_dict(device.status),
        host=host_from_dict(device.host),
        desired_model_version=_model_ref(desired) if desired is not None else "",
    )
    for field, value in (
        ("last_seen", device.last_seen),
        ("created_at", device.created_at),
        ("enrolled_at", device.enrolled_at),
        ("revoked_at", device.revoked_at),
        ("cert_not_after", device.cert_not_after),
    ):
        ts = timestamp(value)
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg


def _model_ref(desired: DesiredModel) -> str:
    """The desired model as operators write a model version: `name:version` (the bare version
    without a name; "" without a version: a send-back to a device that had none), marked when
    it is a shadow candidate (the device keeps serving its model) or an aborted rollout's
    send-back (which applies only to a device serving the aborted version)."""
    if not desired.model_version:
        ref = ""
    elif not desired.model_name:
        ref = desired.model_version
    else:
        ref = f"{desired.model_name}:{desired.model_version}"
    if desired.shadow:
        return f"{ref} (shadow)"
    if desired.revert_version:
        return f"{ref or '-'} (if serving {desired.revert_version})"
    return ref


def device_from_proto(msg: operator_pb2.Device) -> DeviceRecord:
    """The inverse of `device_to_proto` (minus what the proto does not carry)."""
    return DeviceRecord(
        id=msg.id,
        name=msg.name,
        labels=dict(msg.labels),
        profile=msg.profile,
        # A state this client does not know (a newer control plane): shown as pending.
        state=DEVICE_STATE_FROM_PROTO.get(msg.state, DeviceState.PENDING),
        created_at=from_timestamp(msg.created_at, msg.HasField("created_at"))
        or dt.datetime.min.replace(tzinfo=dt.UTC),
        enrolled_at=from_timestamp(msg.enrolled_at, msg.HasField("enrolled_at")),
        revoked_at=from_timestamp(msg.revoked_at, msg.HasField("revoked_at")),
        last_seen=from_timestamp(msg.last_seen, msg.HasField("last_seen")),
        session_open=msg.online,
        agent_version=msg.agent_version,
        status=message_to_dict(msg.status),
        host=message_to_dict(msg.host),
    )


def bootstrap_from_registration(response: operator_pb2.RegisterDeviceResponse) -> Bootstrap:
    """What a freshly registered device needs to enroll, from the register call's answer."""
    return Bootstrap(
        device_id=response.device.id,
        device_name=response.device.name,
        api_address=response.endpoints.api_address,
        device_address=response.endpoints.device_address,
        tls_server_name=response.endpoints.tls_server_name,
        ca_certificate=response.ca_certificate_pem.decode(),
        token=response.enrollment_token,
        expires_at=response.token_expires_at.ToDatetime(tzinfo=dt.UTC),
    )


def bootstrap_from_group(response: operator_pb2.CreateEnrollmentGroupResponse) -> Bootstrap:
    """What a factory image carries to enroll any device of the group."""
    return Bootstrap(
        group=response.group.name,
        api_address=response.endpoints.api_address,
        device_address=response.endpoints.device_address,
        tls_server_name=response.endpoints.tls_server_name,
        ca_certificate=response.ca_certificate_pem.decode(),
        token=response.enrollment_token,
        expires_at=response.group.expires_at.ToDatetime(tzinfo=dt.UTC),
    )


def desired_to_proto(desired: DesiredModel) -> agent_pb2.DesiredState:
    return agent_pb2.DesiredState(
        model_name=desired.model_name,
        model_version=desired.model_version,
        manifest_digest=desired.manifest_digest,
        signature_digest=desired.signature_digest,
        rollout_id=desired.rollout_id,
        shadow=desired.shadow,
        revert_version=desired.revert_version,
    )


_ROLLOUT_STATE = {
    RolloutState.RUNNING: operator_pb2.Rollout.STATE_RUNNING,
    RolloutState.PAUSED: operator_pb2.Rollout.STATE_PAUSED,
    RolloutState.SUCCEEDED: operator_pb2.Rollout.STATE_SUCCEEDED,
    RolloutState.ABORTED: operator_pb2.Rollout.STATE_ABORTED,
    RolloutState.PARTIAL: operator_pb2.Rollout.STATE_PARTIAL,
}


def rollout_to_proto(
    rollout: RolloutRecord,
    targets: Sequence[RolloutTarget],
    names: dict[str, str],
    with_devices: bool = True,
    waiting_for: str = "",
) -> operator_pb2.Rollout:
    g = rollout.gates
    msg = operator_pb2.Rollout(
        waiting_for=waiting_for,
        id=rollout.id,
        model_name=rollout.model_name,
        model_version=rollout.model_version,
        selector=rollout.selector,
        state=_ROLLOUT_STATE[rollout.state],
        current_wave=rollout.current_wave,
        soak_seconds=round(rollout.soak_s),
        reason=rollout.reason,
        gates=operator_pb2.RolloutGates(
            max_failure_fraction=g.max_failure_fraction,
            min_shadow_agreement=g.min_shadow_agreement,
            max_alert_rate_difference=g.max_alert_rate_difference,
            max_latency_regression=g.max_latency_regression,
            min_shadow_windows=g.min_shadow_windows,
        ),
    )
    msg.created_at.FromDatetime(rollout.created_at)
    msg.updated_at.FromDatetime(rollout.updated_at)
    for wave in rollout.waves:
        in_wave = [t for t in targets if t.wave == wave.index]
        w = msg.waves.add(
            index=wave.index,
            size=wave.size,
            target_devices=wave.target,
            updated=sum(t.state is TargetState.UPDATED for t in in_wave),
            failed=sum(t.state is TargetState.FAILED for t in in_wave),
        )
        for field, value in (("started_at", wave.started_at), ("soak_until", wave.soak_until)):
            if value is not None:
                getattr(w, field).FromDatetime(value)
    if with_devices:
        for t in targets:
            msg.devices.add(
                device_id=t.device_id,
                device_name=names.get(t.device_id, t.device_id),
                wave=t.wave,
                state=t.state.value,
                detail=t.detail,
                previous_version=t.previous_version,
                shadow_agreement=t.shadow_agreement,
                shadow_self_agreement=t.shadow_self_agreement,
                shadow_alert_rate_difference=t.shadow_alert_rate_difference,
                shadow_windows=t.shadow_windows,
                latency_ratio=t.latency_ratio,
            )
    return msg


ALERT_STATE = {
    AlertState.FIRING: operator_pb2.Alert.STATE_FIRING,
    AlertState.ACKNOWLEDGED: operator_pb2.Alert.STATE_ACKNOWLEDGED,
    AlertState.RESOLVED: operator_pb2.Alert.STATE_RESOLVED,
    AlertState.RETURNED: operator_pb2.Alert.STATE_RETURNED,
}
ALERT_STATE_OF = {v: k for k, v in ALERT_STATE.items()}


def alert_to_proto(alert: AlertRecord, device_name: str, severity: str = "") -> operator_pb2.Alert:
    msg = operator_pb2.Alert(
        id=alert.id,
        device_id=alert.device_id,
        device_name=device_name,
        asset=alert.asset,
        fault=alert.fault,
        state=ALERT_STATE[alert.state],
        peak_score=alert.peak_score,
        top_sensors=[
            agent_pb2.SensorContribution(sensor=name, contribution=value)
            for name, value in alert.top_sensors
        ],
        notes=[
            f"{n.at.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ} {n.by}: {n.text}" for n in alert.notes
        ],
        model_version=alert.model_version,
        resolved_by=alert.resolved_by,
        revision=alert.revision,
        raised_events=alert.raised_events,
        severity=severity,
        verdict=alert.verdict,
        fault_type=alert.fault_type,
        shelved_by=alert.shelved_by,
        shelve_reason=alert.shelve_reason,
        suppressed_by=alert.suppressed_by,
        acknowledged_by=alert.acknowledged_by,
    )
    msg.first_seen.FromDatetime(alert.first_seen)
    msg.last_seen.FromDatetime(alert.last_seen)
    if alert.resolved_at is not None:
        msg.resolved_at.FromDatetime(alert.resolved_at)
    if alert.shelved_until is not None:
        msg.shelved_until.FromDatetime(alert.shelved_until)
    return msg


def prediction_to_proto(p: PredictionRecord) -> agent_pb2.Prediction:
    msg = agent_pb2.Prediction(
        asset=p.asset,
        score=p.score,
        anomalous=p.anomalous,
        model_version=p.model_version,
        contributions=p.contributions,
    )
    msg.window_start.FromDatetime(p.window_start)
    msg.window_end.FromDatetime(p.window_end)
    return msg


def webhook_to_proto(hook: WebhookRecord) -> operator_pb2.Webhook:
    msg = operator_pb2.Webhook(
        id=hook.id,
        url=hook.url,
        filter=hook.filter,
        delivered=hook.delivered,
        pending=hook.pending,
        dead=hook.dead,
        last_error=hook.last_error,
        kind=hook.kind,
    )
    msg.created_at.FromDatetime(hook.created_at)
    if hook.previous_secret and hook.previous_until is not None:
        msg.previous_secret_until.FromDatetime(hook.previous_until)
    return msg


def maintenance_to_proto(w: MaintenanceWindow) -> operator_pb2.MaintenanceWindow:
    msg = operator_pb2.MaintenanceWindow(
        id=w.id, selector=w.selector, asset=w.asset, reason=w.reason, created_by=w.created_by
    )
    msg.starts_at.FromDatetime(w.starts_at)
    if w.ends_at is not None:
        msg.ends_at.FromDatetime(w.ends_at)
    msg.created_at.FromDatetime(w.created_at)
    return msg


_OUTCOMES = {
    agent_pb2.InstallReport.OUTCOME_INSTALLED: InstallOutcome.INSTALLED,
    agent_pb2.InstallReport.OUTCOME_DOWNLOAD_FAILED: InstallOutcome.DOWNLOAD_FAILED,
    agent_pb2.InstallReport.OUTCOME_VERIFY_FAILED: InstallOutcome.VERIFY_FAILED,
    agent_pb2.InstallReport.OUTCOME_SELF_TEST_FAILED: InstallOutcome.SELF_TEST_FAILED,
    agent_pb2.InstallReport.OUTCOME_START_FAILED_ROLLED_BACK: (
        InstallOutcome.START_FAILED_ROLLED_BACK
    ),
}


def install_report_from_proto(m: agent_pb2.InstallReport) -> InstallReport:
    return InstallReport(
        rollout_id=m.rollout_id,
        model_version=m.model_version,
        outcome=_OUTCOMES.get(m.outcome, InstallOutcome.UNKNOWN),
        detail=m.detail,
        backend=m.backend,
        serving_name=m.serving_name,
        serving_version=m.serving_version,
        retrying=m.retrying,
    )


def install_report_to_proto(r: InstallReport) -> agent_pb2.InstallReport:
    outcome = next((k for k, v in _OUTCOMES.items() if v is r.outcome), 0)
    return agent_pb2.InstallReport(
        rollout_id=r.rollout_id,
        model_version=r.model_version,
        outcome=outcome,  # type: ignore[arg-type]
        detail=r.detail,
        backend=r.backend,
        serving_name=r.serving_name,
        serving_version=r.serving_version,
        retrying=r.retrying,
    )


def shadow_report_from_proto(m: agent_pb2.ShadowReport) -> ShadowReport:
    return ShadowReport(
        rollout_id=m.rollout_id,
        candidate_version=m.candidate_version,
        windows=int(m.windows),
        agreement=m.agreement,
        alert_rate_candidate=m.alert_rate_candidate,
        alert_rate_incumbent=m.alert_rate_incumbent,
        latency_p99_ms=m.latency_p99_ms,
        incumbent_latency_p99_ms=m.incumbent_latency_p99_ms,
        detail=m.detail,
        self_agreement=_unit(m.incumbent_self_agreement),
        self_rate_difference=_unit(m.incumbent_self_rate_difference),
        latency_p50_ms=_milliseconds(m.latency_p50_ms),
        incumbent_latency_p50_ms=_milliseconds(m.incumbent_latency_p50_ms),
        latency_samples=int(m.latency_samples),
    )


def _milliseconds(value: float) -> float:
    """A latency from a device: NaN, negative or infinite is taken as not measured (0)."""
    return value if 0.0 <= value < float("inf") else 0.0


def _unit(value: float) -> float:
    """A fraction from a device: NaN or out of [0, 1] is taken as not measured (0)."""
    return value if 0.0 <= value <= 1.0 else 0.0


def shadow_report_to_proto(r: ShadowReport) -> agent_pb2.ShadowReport:
    return agent_pb2.ShadowReport(
        rollout_id=r.rollout_id,
        candidate_version=r.candidate_version,
        windows=r.windows,
        agreement=r.agreement,
        alert_rate_candidate=r.alert_rate_candidate,
        alert_rate_incumbent=r.alert_rate_incumbent,
        latency_p99_ms=r.latency_p99_ms,
        incumbent_latency_p99_ms=r.incumbent_latency_p99_ms,
        detail=r.detail,
        incumbent_self_agreement=r.self_agreement,
        incumbent_self_rate_difference=r.self_rate_difference,
        latency_p50_ms=r.latency_p50_ms,
        incumbent_latency_p50_ms=r.incumbent_latency_p50_ms,
        latency_samples=r.latency_samples,
    )


def model_to_proto(record: ModelRecord, artifacts: ArtifactStore) -> operator_pb2.Model:
    manifest = Manifest.model_validate(record.manifest)
    model = operator_pb2.Model(
        name=record.name,
        version=record.version,
        manifest_digest=record.manifest_digest,
        signature_digest=record.signature_digest,
        size_bytes=record.size_bytes,
        sensors=[common_pb2.SensorSpec(name=s.name, unit=s.unit) for s in manifest.sensors],
        metrics={
            k: float(v)
            for k, v in manifest.evaluation.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
    )
    model.pushed_at.FromDatetime(record.pushed_at)
    for v in manifest.variants:
        model.variants.append(
            operator_pb2.ModelVariant(
                name=v.name,
                format=v.format,
                precision=v.precision,
                target_profile="" if v.target_profile == "any" else v.target_profile,
                digest=ARTIFACT_PREFIX + v.sha256,
                size=artifacts.size(ARTIFACT_PREFIX + v.sha256)
                if artifacts.has(ARTIFACT_PREFIX + v.sha256)
                else 0,
            )
        )
    return model


def _stored_size(artifacts: ArtifactStore, digest: str) -> int:
    return artifacts.size(digest) if artifacts.has(digest) else 0


async def bundle_chunks(
    chunks: AsyncIterator[operator_pb2.PushBundleChunk],
) -> AsyncIterator[BundleFile | bytes]:
    """A push stream as the catalog takes it: a `BundleFile` per header, then its bytes."""
    async for chunk in chunks:
        body = chunk.WhichOneof("body")
        if body == "file":
            yield BundleFile(chunk.file.path, chunk.file.digest, chunk.file.size)
        elif body == "data":
            yield chunk.data
        else:
            raise InvalidInput("a push chunk carries neither a file header nor data")


def capture_to_proto(
    record: CaptureRecord, label: CaptureLabel, device_name: str
) -> operator_pb2.CapturedWindow:
    """A stored capture as the operator API lists it."""
    capture = agent_pb2.WindowCapture(
        reason=CAPTURE_REASONS[record.reason],
        asset=record.asset,
        model_version=record.model_version,
        alert_key=record.alert_key,
        score=record.score,
        period_seconds=record.period_s,
        length=record.length,
        sensors=record.sensors,
        values=record.values,
        mask=record.mask,
        input_center=record.input_center,
        input_scale=record.input_scale,
    )
    if record.calibration is not None:
        capture.calibration.CopyFrom(calibration_to_proto(record.calibration))
    capture.window_start.FromDatetime(record.window_start)
    window = operator_pb2.CapturedWindow(
        device_id=record.device_id,
        device_name=device_name,
        sequence=record.sequence,
        capture=capture,
        alert_id=label.alert_id,
        verdict=label.verdict,
        fault_type=label.fault_type,
    )
    if record.received_at is not None:
        window.received_at.FromDatetime(record.received_at)
    return window


CAPTURE_REASONS = {
    "alert": agent_pb2.WindowCapture.REASON_ALERT,
    "sample": agent_pb2.WindowCapture.REASON_SAMPLE,
}
