"""SQLAlchemy table definitions; Alembic migrations create and evolve them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC and always returns timezone-aware UTC datetimes (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    profile: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    enrolled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    revoked_reason: Mapped[str] = mapped_column(Text, default="")
    cert_serial: Mapped[str] = mapped_column(String(64), default="")
    cert_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    cert_not_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The certificate renewed from: accepted until previous_valid_until (a renewal's grace).
    previous_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    previous_valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    session_open: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    host: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EnrollmentTokenRow(Base):
    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    invalidated: Mapped[bool] = mapped_column(Boolean, default=False)


class EnrollmentGroupRow(Base):
    """One token that enrolls up to `max_uses` devices naming themselves (factory images)."""

    __tablename__ = "enrollment_groups"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)  # values may hold "{name}"
    profile: Mapped[str] = mapped_column(String(64))
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OperatorRow(Base):
    __tablename__ = "operators"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    role: Mapped[str] = mapped_column(String(16), default="admin")


class AuditRow(Base):
    """One mutating operator call: who, what, when, with which result."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    operator: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    code: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(1024))


class PredictionRow(Base):
    __tablename__ = "predictions"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    asset: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    score: Mapped[float] = mapped_column(Float)
    anomalous: Mapped[bool] = mapped_column(Boolean)
    model_version: Mapped[str] = mapped_column(String(64))
    contributions: Mapped[dict[str, float]] = mapped_column(JSON)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AlertEventRow(Base):
    __tablename__ = "alert_events"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    alert_key: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    asset: Mapped[str] = mapped_column(String(64))
    fault: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    top_sensors: Mapped[list[list[Any]]] = mapped_column(JSON)
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    raised_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    model_version: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class CaptureRow(Base):
    """A captured window (`cloud.captures.CaptureRecord`)."""

    __tablename__ = "window_captures"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reason: Mapped[str] = mapped_column(String(16))
    asset: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    alert_key: Mapped[str] = mapped_column(String(128), index=True)
    score: Mapped[float] = mapped_column(Float)
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    period_s: Mapped[float] = mapped_column(Float)
    length: Mapped[int] = mapped_column(Integer)
    sensors: Mapped[list[str]] = mapped_column(JSON)
    values: Mapped[bytes] = mapped_column(LargeBinary)
    mask: Mapped[bytes] = mapped_column(LargeBinary)
    input_center: Mapped[list[float]] = mapped_column(JSON)
    input_scale: Mapped[list[float]] = mapped_column(JSON)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # `CaptureCalibration.as_doc()`; NULL for captures from agents that did not send it.
    calibration: Mapped[dict[str, list[float]] | None] = mapped_column(JSON, nullable=True)


class CaptureDayRow(Base):
    """What a device's captures took of its day's budget (`cloud.capture_budget`)."""

    __tablename__ = "capture_days"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[int] = mapped_column(Integer)  # days since 1970-01-01, UTC
    captures: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    refused: Mapped[int] = mapped_column(BigInteger)


class DeviceSyncRow(Base):
    """Highest record sequence stored per device (what a reconnecting agent resumes after)."""

    __tablename__ = "device_sync"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    last_sequence: Mapped[int] = mapped_column(BigInteger)


class ModelRow(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    manifest_digest: Mapped[str] = mapped_column(String(71))
    signature_digest: Mapped[str] = mapped_column(String(71))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    pushed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)


class DesiredModelRow(Base):
    __tablename__ = "desired_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    manifest_digest: Mapped[str] = mapped_column(String(71))
    signature_digest: Mapped[str] = mapped_column(String(71))
    rollout_id: Mapped[str] = mapped_column(String(36))
    shadow: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revert_version: Mapped[str] = mapped_column(String(64), default="")
    revision: Mapped[int] = mapped_column(BigInteger, default=0, index=True)


class DesiredRevisionRow(Base):
    """One row: the last desired-state revision handed out (the change feed's position)."""

    __tablename__ = "desired_revision"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    selector: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)  # waves, gates, soak, current wave
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)  # compare-and-set


class RolloutTargetRow(Base):
    __tablename__ = "rollout_targets"

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    wave: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, index=True)  # its rollout is running/paused
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)  # detail, previous version, shadow report
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)  # compare-and-set


class AlertRow(Base):
    """Alerts grouped from edge events; `open_key` (device/asset/fault) is set while the
    alert is open, so a group has at most one open alert (NULLs do not collide)."""

    __tablename__ = "alerts"
    __table_args__ = (  # the open alerts per device, counted for each batch (migration 0017)
        Index(
            "ix_alerts_open_device",
            "device_id",
            postgresql_where=text("open_key IS NOT NULL"),
            sqlite_where=text("open_key IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    asset: Mapped[str] = mapped_column(String(64))
    fault: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    open_key: Mapped[str | None] = mapped_column(String(240), unique=True, nullable=True)
    revision: Mapped[int] = mapped_column(BigInteger, unique=True)
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)  # peak, top sensors, notes, ...


class AlertRevisionRow(Base):
    """One row: the last alert revision handed out."""

    __tablename__ = "alert_revision"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class WebhookRow(Base):
    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    # Kept as given: the control plane signs with it. Protect the database like the keys.
    secret: Mapped[str] = mapped_column(Text)
    filter: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(16), default="standard")
    previous_secret: Mapped[str] = mapped_column(Text, default="")  # signs until previous_until
    previous_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class MaintenanceRow(Base):
    """A maintenance window (or, without an end, an out-of-service period)."""

    __tablename__ = "maintenance_windows"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    selector: Mapped[str] = mapped_column(Text)
    asset: Mapped[str] = mapped_column(String(64))  # "": every asset
    starts_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class DeliveryRow(Base):
    """The webhook outbox: written in the transaction that changes the alert."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "alert_id", "revision"),
        # The sender's "oldest pending of its webhook and alert" and the repeats' "latest".
        Index("ix_deliveries_webhook_alert", "webhook_id", "alert_id", "id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    webhook_id: Mapped[str] = mapped_column(
        ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    alert_id: Mapped[str] = mapped_column(String(36))
    revision: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | dead
    attempts: Mapped[int] = mapped_column(BigInteger)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    last_error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LeaseRow(Base):
    """A named lease (leader election without Kubernetes): one holder until `expires_at`."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    acquired_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class DeviceSessionRow(Base):
    """A device's newest session across replicas and its recent replacements
    (`cloud.session_claims`); times are wall-clock seconds."""

    __tablename__ = "device_sessions"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    generation: Mapped[int] = mapped_column(BigInteger)
    replica: Mapped[str] = mapped_column(String(200))
    peer: Mapped[str] = mapped_column(String(300))
    replaced_at: Mapped[list[float]] = mapped_column(JSON, default=list)
    flapping_at: Mapped[float | None] = mapped_column(Float, nullable=True)
