"""Bounds on every field a device or an operator sends, checked at the service edge.

Whatever reaches the domain and the database has passed here: strings without NUL bytes and
within their column's length, timestamps inside the years 1-9999, integers that fit a signed
64-bit column, finite floating-point values, bounded repeated fields and maps, and bounded
nested messages (a device's status); the times on a device's records, besides, within a
plausible range of when they arrived (`RecordTimes`). A violation is an `InvalidInput` naming
the field by its path in the request (`records[3].alert.top_sensors[70]`), never a database
error and never an INTERNAL answer. The limits are documented in README.md ("Limits on what
callers send").
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from edge_agent.errors import InvalidInput

DEFAULT_STRING = 1024  # characters, for any string field not named below
DEFAULT_REPEATED = 1000  # entries of a repeated field or a map not named below
MAX_INT64 = 2**63 - 1
# google.protobuf.Timestamp's own valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799

_NAME = 128  # device, model, operator and sensor names
_VERSION = 64
_ID = 36  # uuids; alert ids may be given as a short prefix
STRING_LIMITS: dict[str, int] = {
    "autoglm.v1.AddOperatorRequest.name": _NAME,
    "autoglm.v1.AddOperatorRequest.role": 16,
    "autoglm.v1.RevokeOperatorRequest.name": _NAME,
    "autoglm.v1.ListAuditRequest.operator": _NAME,
    "autoglm.v1.Hello.agent_version": 32,
    "autoglm.v1.EnrollRequest.agent_version": 32,
    "autoglm.v1.AgentStatus.model_name": _NAME,
    "autoglm.v1.AgentStatus.model_version": _VERSION,
    "autoglm.v1.AgentStatus.inference_backend": 64,
    "autoglm.v1.AgentStatus.slot": 64,
    "autoglm.v1.AgentHealth.IngestRatePerSEntry.key": _NAME,
    "autoglm.v1.AgentHealth.DroppedByReasonEntry.key": _NAME,
    "autoglm.v1.AgentHealth.ClockOffsetSEntry.key": _NAME,
    "autoglm.v1.AgentHealth.DriftEntry.key": _NAME,
    "autoglm.v1.AssetDrift.input_shift_sensor": _NAME,
    "autoglm.v1.AgentHealth.SensorClockOffsetSEntry.key": 2 * _NAME + 1,  # "asset/sensor"
    "autoglm.v1.HostFacts.hostname": 255,
    "autoglm.v1.HostFacts.os": 255,
    "autoglm.v1.HostFacts.arch": 64,
    "autoglm.v1.HostFacts.python_version": 64,
    "autoglm.v1.HostFacts.gpu": 255,
    "autoglm.v1.HostFacts.jetpack_version": 64,
    "autoglm.v1.Prediction.asset": 64,
    "autoglm.v1.Prediction.model_version": _VERSION,
    "autoglm.v1.Prediction.ContributionsEntry.key": _NAME,
    "autoglm.v1.AlertEvent.alert_key": 128,
    "autoglm.v1.AlertEvent.asset": 64,
    "autoglm.v1.AlertEvent.fault": 64,
    "autoglm.v1.AlertEvent.model_version": _VERSION,
    "autoglm.v1.SensorContribution.sensor": _NAME,
    "autoglm.v1.WindowCapture.asset": 64,
    "autoglm.v1.WindowCapture.model_version": _VERSION,
    "autoglm.v1.WindowCapture.alert_key": 128,
    "autoglm.v1.WindowCapture.sensors": _NAME,
    "autoglm.v1.ListCapturesRequest.selector": 1024,
    "autoglm.v1.ListCapturesRequest.device": _NAME,
    "autoglm.v1.ListCapturesRequest.verdict": 16,
    "autoglm.v1.InstallReport.model_version": _VERSION,
    "autoglm.v1.InstallReport.rollout_id": _ID,
    "autoglm.v1.InstallReport.serving_name": _NAME,
    "autoglm.v1.InstallReport.serving_version": _VERSION,
    "autoglm.v1.InstallReport.backend": 64,
    "autoglm.v1.ShadowReport.rollout_id": _ID,
    "autoglm.v1.ShadowReport.candidate_version": _VERSION,
    "autoglm.v1.ShadowReport.incumbent_version": _VERSION,
    "autoglm.v1.DownloadArtifactRequest.digest": 71,
    "autoglm.v1.BundleFileHeader.digest": 71,
    "autoglm.v1.BundleFileHeader.path": 255,
    "autoglm.v1.RegisterDeviceRequest.name": _NAME,
    "autoglm.v1.RegisterDeviceRequest.profile": 64,
    "autoglm.v1.RegisterDeviceRequest.LabelsEntry.key": 63,
    "autoglm.v1.RegisterDeviceRequest.LabelsEntry.value": 63,
    "autoglm.v1.LabelDeviceRequest.SetEntry.key": 63,
    "autoglm.v1.LabelDeviceRequest.SetEntry.value": 63,
    "autoglm.v1.LabelDeviceRequest.remove": 63,
    "autoglm.v1.IssueEnrollmentTokenRequest.device": _NAME,
    "autoglm.v1.GetDeviceRequest.device": _NAME,
    "autoglm.v1.LabelDeviceRequest.device": _NAME,
    "autoglm.v1.RevokeDeviceRequest.device": _NAME,
    "autoglm.v1.DeleteDeviceRequest.device": _NAME,
    "autoglm.v1.QueryPredictionsRequest.device": _NAME,
    "autoglm.v1.QueryPredictionsRequest.asset": 64,
    "autoglm.v1.ListAlertsRequest.device": _NAME,
    "autoglm.v1.WatchAlertsRequest.device": _NAME,
    "autoglm.v1.ListModelsRequest.name": _NAME,
    "autoglm.v1.GetModelRequest.name": _NAME,
    "autoglm.v1.GetModelRequest.version": _VERSION,
    "autoglm.v1.CreateRolloutRequest.model_name": _NAME,
    "autoglm.v1.CreateRolloutRequest.model_version": _VERSION,
    "autoglm.v1.CreateRolloutRequest.waves": 16,
    "autoglm.v1.GetRolloutRequest.id": _ID,
    "autoglm.v1.RolloutActionRequest.id": _ID,
    "autoglm.v1.GetAlertRequest.id": _ID,
    "autoglm.v1.AckAlertRequest.id": _ID,
    "autoglm.v1.ResolveAlertRequest.id": _ID,
    "autoglm.v1.AckAlertRequest.note": 2000,
    "autoglm.v1.ResolveAlertRequest.note": 2000,
    "autoglm.v1.RemoveWebhookRequest.id": _ID,
    "autoglm.v1.AddWebhookRequest.url": 2048,
    "autoglm.v1.AddWebhookRequest.secret": 256,
    "autoglm.v1.EnrollRequest.token": 128,
}
REPEATED_LIMITS: dict[str, int] = {
    "autoglm.v1.RecordBatch.records": 5000,
    "autoglm.v1.AlertEvent.top_sensors": 64,
    "autoglm.v1.Prediction.contributions": 256,
    "autoglm.v1.WindowCapture.sensors": 256,
    "autoglm.v1.WindowCapture.input_center": 256,
    "autoglm.v1.WindowCapture.input_scale": 256,
    "autoglm.v1.DecisionCalibration.residual_scale": 256,
    "autoglm.v1.DecisionCalibration.level_center": 256,
    "autoglm.v1.DecisionCalibration.level_scale": 256,
    "autoglm.v1.DecisionCalibration.spread_center": 256,
    "autoglm.v1.DecisionCalibration.level_precision": 256 * 256,
    "autoglm.v1.DecisionCalibration.subspace_center": 256,
    "autoglm.v1.DecisionCalibration.subspace_basis": 256 * 256,  # N x k, k < N
    "autoglm.v1.DecisionCalibration.subspace_scale": 256,
    # An agent's health, by asset: at most 256 assets (each of these maps has an entry per
    # asset at most); drop reasons: the agent reports 34 (edge_agent/health.py _REPORTED),
    # room left for newer agents'; lost stretches: the agent keeps the latest 20
    # (edge_agent/losses.py KEPT). Each entry costs checking time on the event loop.
    "autoglm.v1.AgentHealth.ingest_rate_per_s": 256,
    "autoglm.v1.AgentHealth.dropped_by_reason": 64,
    "autoglm.v1.AgentHealth.clock_offset_s": 256,
    "autoglm.v1.AgentHealth.drift": 256,
    "autoglm.v1.AgentHealth.lost_records": 20,
    "autoglm.v1.RegisterDeviceRequest.labels": 64,
    "autoglm.v1.LabelDeviceRequest.set": 64,
    "autoglm.v1.LabelDeviceRequest.remove": 64,
    "autoglm.v1.CreateRolloutRequest.waves": 32,
}
# Encoded size of nested messages stored whole (a device's status lands in every device list).
MESSAGE_BYTES: dict[str, int] = {
    "autoglm.v1.AgentStatus": 64 * 1024,
    "autoglm.v1.HostFacts": 8 * 1024,
}
_INTEGERS = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
)
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def check_request_message(message: Message) -> None:
    """One message of a request stream. A device's record batch is checked record by record
    where it is stored (`cloud.records`): a bad record is answered, not fatal to the session."""
    if message.DESCRIPTOR.full_name == "autoglm.v1.AgentMessage" and message.HasField("records"):
        batch = message.records  # type: ignore[attr-defined]
        _check_count(batch.DESCRIPTOR.fields_by_name["records"], len(batch.records), "records")
        return
    check_message(message)


def check_message(message: Message, path: str = "") -> None:
    """Raises InvalidInput naming the first field of `message` out of its bounds."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":
        _check_timestamp(message, path)
        return
    limit = MESSAGE_BYTES.get(descriptor.full_name)
    if limit is not None and message.ByteSize() > limit:
        raise InvalidInput(f"{path or descriptor.name}: {message.ByteSize()} bytes > {limit}")
    for field, value in message.ListFields():
        if not field.is_repeated and field.type != FieldDescriptor.TYPE_MESSAGE:
            if not _scalars_fit(field, (value,)):  # the path is built for a failure only
                _check_scalar(field, value, f"{path}.{field.name}" if path else field.name)
            continue
        where = f"{path}.{field.name}" if path else field.name
        if _is_map(field):
            _check_count(field, len(value), where)
            entry = field.message_type
            assert entry is not None
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            keys_fit = _scalars_fit(key_field, value.keys())
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                values_fit = False
            else:
                values_fit = _scalars_fit(value_field, value.values())
            if keys_fit and values_fit:
                continue  # all within bounds: no per-entry paths to build
            for key, item in value.items():
                at = f"{where}[{_show(key)}]"
                if not keys_fit:
                    _check_scalar(key_field, key, at)
                _check_value(value_field, item, at)
        elif field.is_repeated:
            _check_count(field, len(value), where)
            if field.type != FieldDescriptor.TYPE_MESSAGE and _scalars_fit(field, value):
                continue
            for i, item in enumerate(value):
                _check_value(field, item, f"{where}[{i}]")
        else:
            _check_value(field, value, where)


def _scalars_fit(field: FieldDescriptor, values: Iterable[Any]) -> bool:
    """Whether every one of `values` passes `_check_scalar` for `field`: the quick test of a
    whole map or list, which names nothing (the per-entry check words a failure)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        limit = STRING_LIMITS.get(field.full_name, DEFAULT_STRING)
        return all(len(v) <= limit and "\x00" not in v for v in values)
    if field.type in _INTEGERS:
        return all(v <= MAX_INT64 for v in values)
    if field.type in _FLOATS:
        return all(map(math.isfinite, values))
    return True  # bools, enums, bytes: nothing to bound per value


def _check_value(field: FieldDescriptor, value: object, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        check_message(value, where)
    else:
        _check_scalar(field, value, where)


def _check_scalar(field: FieldDescriptor, value: object, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        limit = STRING_LIMITS.get(field.full_name, DEFAULT_STRING)
        if len(value) > limit:
            raise InvalidInput(f"{where}: {len(value)} characters > {limit}")
        if "\x00" in value:
            raise InvalidInput(f"{where}: contains a NUL character")
    elif field.type in _INTEGERS:
        assert isinstance(value, int)
        if value > MAX_INT64:
            raise InvalidInput(f"{where}: {value} is larger than {MAX_INT64}")
    elif field.type in _FLOATS:
        assert isinstance(value, float)
        if not math.isfinite(value):
            raise InvalidInput(f"{where}: {value} is not a finite number")


def _check_count(field: FieldDescriptor, count: int, where: str) -> None:
    limit = REPEATED_LIMITS.get(field.full_name, DEFAULT_REPEATED)
    if count > limit:
        raise InvalidInput(f"{where}: {count} entries > {limit}")


def _check_timestamp(stamp: Message, where: str) -> None:
    seconds, nanos = stamp.seconds, stamp.nanos  # type: ignore[attr-defined]
    if not MIN_SECONDS <= seconds <= MAX_SECONDS or not 0 <= nanos <= 999_999_999:
        raise InvalidInput(
            f"{where}: timestamp {seconds}s {nanos}ns is outside 0001-01-01..9999-12-31"
        )


# The times on a device's records (a prediction's or an alert's window, when the alert was
# raised, a capture's window start) are the device's clock or its sensors'. Taken from
# EARLIEST_RECORD_TIME to RECORD_TIME_AHEAD past the batch's arrival: a time at the calendar's
# ends kept the alert at the top of every listing and inside every "since" filter for good.
EARLIEST_RECORD_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
RECORD_TIME_AHEAD = dt.timedelta(days=1)
_RECORD_TIME_FIELDS = ("window_start", "window_end", "raised_at")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class RecordTimes:
    """The times the records of a batch received at one moment may carry, in seconds since
    the epoch (whole seconds: the nanoseconds of a time at either bound do not matter)."""

    earliest_s: int
    latest_s: int
    received: dt.datetime

    @classmethod
    def received_at(cls, received: dt.datetime) -> RecordTimes:
        return cls(
            int(EARLIEST_RECORD_TIME.timestamp()),
            int((received + RECORD_TIME_AHEAD).timestamp()),
            received,
        )

    def fits(self, start: tuple[int, int], end: tuple[int, int]) -> bool:
        """Whether a window from `start` to `end` (each seconds and a fraction, in the same
        unit) passes `check`: the prediction fast path's test, on the numbers it read."""
        return self.earliest_s <= start[0] and start <= end and end[0] <= self.latest_s

    def check(self, record: Message, where: str) -> None:
        """Raises InvalidInput naming the first time of a synced record (its prediction,
        alert event or capture; `check_message` passed) out of range, or a window that ends
        before it starts."""
        body_name = record.WhichOneof("body")
        if body_name is None:
            return
        body = getattr(record, body_name)
        stamps = {
            name: getattr(body, name)
            for name in _RECORD_TIME_FIELDS
            if name in body.DESCRIPTOR.fields_by_name
        }
        for name, stamp in stamps.items():
            at = f"{where}.{body_name}.{name}"
            if stamp.seconds < self.earliest_s:
                raise InvalidInput(
                    f"{at}: {_iso(stamp)} is before {EARLIEST_RECORD_TIME:%Y-%m-%d} (unset, or "
                    "the device's or its sensors' clock is wrong)"
                )
            if stamp.seconds > self.latest_s:
                raise InvalidInput(
                    f"{at}: {_iso(stamp)} is more than a day after the batch arrived "
                    f"({_utc_text(self.received)}): the device's or its sensors' clock "
                    "is ahead"
                )
        start, end = stamps.get("window_start"), stamps.get("window_end")
        if start is not None and end is not None and _key(end) < _key(start):
            raise InvalidInput(
                f"{where}.{body_name}.window_end: {_iso(end)} is before its window_start "
                f"{_iso(start)}"
            )


def _utc_text(when: dt.datetime) -> str:
    """2026-11-01T12:00:00Z; years before 1000 with their four digits (strftime drops them)."""
    return when.astimezone(dt.UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def _key(stamp: Message) -> tuple[int, int]:
    return stamp.seconds, stamp.nanos  # type: ignore[attr-defined]


def _iso(stamp: Message) -> str:
    seconds = stamp.seconds  # type: ignore[attr-defined]
    if MIN_SECONDS <= seconds <= MAX_SECONDS:
        return _utc_text(_EPOCH + dt.timedelta(seconds=seconds))
    return f"{seconds}s since the epoch"


def _is_map(field: FieldDescriptor) -> bool:
    entry: Descriptor | None = field.message_type
    return bool(field.is_repeated and entry is not None and entry.GetOptions().map_entry)


def _show(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."
