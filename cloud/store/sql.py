"""The SQLAlchemy store: one implementation for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, bindparam, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.domain import (
    AlertEventRecord,
    DesiredModel,
    DeviceRecord,
    DeviceState,
    Gates,
    ModelRecord,
    OperatorRecord,
    PredictionRecord,
    PresenceUpdate,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    StoredCount,
    TargetState,
    Wave,
    matches,
)
from cloud.store.base import Store
from cloud.store.tables import (
    AlertEventRow,
    DesiredModelRow,
    DeviceRow,
    DeviceSyncRow,
    EnrollmentTokenRow,
    ModelRow,
    OperatorRow,
    PredictionRow,
    RolloutRow,
    RolloutTargetRow,
)
from edge_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
_OPTIONAL_PRESENCE_FIELDS = ("agent_version", "status", "host")


def normalise_url(url: str) -> str:
    """Accepts plain `postgresql://` URLs and uses the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def migrate(engine: Engine) -> None:
    """Brings the schema to the newest migration."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class SqlStore(Store):
    """`Store` over SQLAlchemy 2."""

    def __init__(self, url: str, run_migrations: bool = True) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        try:
            if run_migrations:
                migrate(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise Unavailable(f"cannot open the database {_redact(self.url)}: {exc.orig}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ---- devices ----
    def create_device(
        self, name: str, labels: Mapping[str, str], profile: str, now: dt.datetime
    ) -> DeviceRecord:
        row = DeviceRow(
            id=str(uuid.uuid4()),
            name=name,
            labels=dict(labels),
            profile=profile,
            state=DeviceState.PENDING.value,
            created_at=now,
            revoked_reason="",
            cert_serial="",
            cert_fingerprint="",
            session_open=False,
            agent_version="",
            status={},
            host={},
        )
        try:
            with self._tx() as s:
                s.add(row)
        except SAIntegrityError:
            raise AlreadyExists(f"a device named '{name}' exists already") from None
        return _device(row)

    def get_device(self, id_or_name: str) -> DeviceRecord:
        with self._tx() as s:
            return _device(self._device_row(s, id_or_name))

    def list_devices(self, selector: Mapping[str, str]) -> list[DeviceRecord]:
        with self._tx() as s:
            rows = s.scalars(select(DeviceRow).order_by(DeviceRow.name)).all()
            return [_device(r) for r in rows if matches(r.labels, selector)]

    def update_labels(
        self, id_or_name: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> DeviceRecord:
        with self._tx() as s:
            row = self._device_row(s, id_or_name, for_update=True)
            labels = {k: v for k, v in row.labels.items() if k not in remove}
            labels.update(set_labels)
            row.labels = labels
            return _device(row)

    def revoke_device(self, id_or_name: str, reason: str, now: dt.datetime) -> DeviceRecord:
        with self._tx() as s:
            row = self._device_row(s, id_or_name, for_update=True)
            if row.state != DeviceState.REVOKED.value:
                row.state = DeviceState.REVOKED.value
                row.revoked_at = now
                row.revoked_reason = reason
                row.session_open = False
                s.execute(
                    update(EnrollmentTokenRow)
                    .where(EnrollmentTokenRow.device_id == row.id)
                    .values(invalidated=True)
                )
            return _device(row)

    def _device_row(self, s: Session, id_or_name: str, for_update: bool = False) -> DeviceRow:
        query = select(DeviceRow).where(
            (DeviceRow.id == id_or_name) | (DeviceRow.name == id_or_name)
        )
        if for_update:
            query = query.with_for_update()
        row = s.scalars(query).first()
        if row is None:
            raise NotFound(f"no device with id or name '{id_or_name}'")
        return row

    # ---- enrollment ----
    def add_enrollment_token(
        self, device_id: str, token_hash: str, now: dt.datetime, expires_at: dt.datetime
    ) -> None:
        with self._tx() as s:
            row = self._device_row(s, device_id, for_update=True)
            if row.state == DeviceState.REVOKED.value:
                raise FailedPrecondition(f"device '{row.name}' is revoked; register a new device")
            s.execute(
                update(EnrollmentTokenRow)
                .where(EnrollmentTokenRow.device_id == row.id, EnrollmentTokenRow.used_at.is_(None))
                .values(invalidated=True)
            )
            s.add(
                EnrollmentTokenRow(
                    token_hash=token_hash,
                    device_id=row.id,
                    created_at=now,
                    expires_at=expires_at,
                    invalidated=False,
                )
            )

    def enroll(
        self,
        token_hash: str,
        now: dt.datetime,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str]],
    ) -> tuple[DeviceRecord, T]:
        with self._tx() as s:
            token = s.get(EnrollmentTokenRow, token_hash)
            if token is None:
                raise Unauthenticated("unknown enrollment token")
            if token.used_at is not None:
                raise Unauthenticated("this enrollment token was used already")
            if token.invalidated:
                raise Unauthenticated("this enrollment token was replaced or its device revoked")
            if token.expires_at <= now:
                raise Unauthenticated(
                    f"this enrollment token expired at {token.expires_at.isoformat()}"
                )
            row = self._device_row(s, token.device_id, for_update=True)
            if row.state == DeviceState.REVOKED.value:
                raise PermissionDenied(f"device '{row.name}' is revoked")
            issued = issue(_device(row))
            serial, fingerprint = activate(issued)
            # The conditional update makes the token single-use even under concurrent calls.
            claimed = s.execute(
                update(EnrollmentTokenRow)
                .where(
                    EnrollmentTokenRow.token_hash == token_hash,
                    EnrollmentTokenRow.used_at.is_(None),
                    EnrollmentTokenRow.invalidated.is_(False),
                )
                .values(used_at=now)
            ).rowcount  # type: ignore[attr-defined]
            if claimed != 1:
                raise Unauthenticated("this enrollment token was used already")
            row.state = DeviceState.ACTIVE.value
            row.enrolled_at = now
            row.cert_serial = serial
            row.cert_fingerprint = fingerprint
            return _device(row), issued

    # ---- presence ----
    def record_presence(self, updates: Sequence[PresenceUpdate]) -> None:
        # One executemany per combination of fields present (a heartbeat carries status only,
        # a hello everything): a statement per device would cost more than all heartbeats.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for u in updates:
            params: dict[str, Any] = {
                "b_id": u.device_id,
                "b_last_seen": u.last_seen,
                "b_session_open": u.session_open,
            }
            for name in _OPTIONAL_PRESENCE_FIELDS:
                value = getattr(u, name)
                if value is not None:
                    params[f"b_{name}"] = value
            groups.setdefault(tuple(sorted(params)), []).append(params)
        if not groups:
            return
        with self._tx() as s:
            conn = s.connection()  # Core executemany, not the ORM's bulk-by-primary-key path
            for keys, rows in groups.items():
                values: dict[str, Any] = {k[2:]: bindparam(k) for k in keys if k != "b_id"}
                statement = (
                    update(DeviceRow)
                    .where(
                        DeviceRow.id == bindparam("b_id"),
                        DeviceRow.state == DeviceState.ACTIVE.value,
                    )
                    .values(**values)
                )
                conn.execute(statement, rows)

    def revoked_since(self, since: dt.datetime) -> list[str]:
        with self._tx() as s:
            return list(s.scalars(select(DeviceRow.id).where(DeviceRow.revoked_at >= since)).all())

    # ---- synced records ----
    def store_records(
        self,
        device_id: str,
        predictions: Sequence[PredictionRecord],
        alerts: Sequence[AlertEventRecord],
        now: dt.datetime,
    ) -> StoredCount:
        sequences = [p.sequence for p in predictions] + [a.sequence for a in alerts]
        if len(set(sequences)) != len(sequences):
            raise InvalidInput("a record batch repeats a sequence number")
        with self._tx() as s:
            sync = s.get(DeviceSyncRow, device_id, with_for_update=True)
            if sync is None:
                if s.get(DeviceRow, device_id) is None:
                    raise NotFound(f"no device with id '{device_id}'")
                sync = DeviceSyncRow(device_id=device_id, last_sequence=0)
                s.add(sync)
                s.flush()
            existing: set[int] = set()
            if sequences:
                for table in (PredictionRow, AlertEventRow):
                    existing.update(
                        s.scalars(
                            select(table.sequence).where(
                                table.device_id == device_id, table.sequence.in_(sequences)
                            )
                        ).all()
                    )
            new_predictions = [p for p in predictions if p.sequence not in existing]
            new_alerts = [a for a in alerts if a.sequence not in existing]
            s.add_all(_prediction_row(p, now) for p in new_predictions)
            s.add_all(_alert_row(a, now) for a in new_alerts)
            if sequences:
                sync.last_sequence = max(sync.last_sequence, *sequences)
            stored = len(new_predictions) + len(new_alerts)
            return StoredCount(stored, len(sequences) - stored, sync.last_sequence)

    def last_record_sequence(self, device_id: str) -> int:
        with self._tx() as s:
            sync = s.get(DeviceSyncRow, device_id)
            return sync.last_sequence if sync is not None else 0

    def list_predictions(
        self, device_id: str, asset: str = "", since: dt.datetime | None = None, limit: int = 1000
    ) -> list[PredictionRecord]:
        query = select(PredictionRow).where(PredictionRow.device_id == device_id)
        if asset:
            query = query.where(PredictionRow.asset == asset)
        if since is not None:
            query = query.where(PredictionRow.window_end >= since)
        query = query.order_by(PredictionRow.sequence.desc()).limit(limit)
        with self._tx() as s:
            rows = list(s.scalars(query).all())
        return [_prediction(r) for r in reversed(rows)]

    def list_alert_events(
        self, device_id: str = "", since: dt.datetime | None = None, limit: int = 1000
    ) -> list[AlertEventRecord]:
        query = select(AlertEventRow)
        if device_id:
            query = query.where(AlertEventRow.device_id == device_id)
        if since is not None:
            query = query.where(AlertEventRow.received_at >= since)
        query = query.order_by(AlertEventRow.device_id, AlertEventRow.sequence).limit(limit)
        with self._tx() as s:
            return [_alert(r) for r in s.scalars(query).all()]

    # ---- models ----
    def add_model(self, model: ModelRecord) -> ModelRecord:
        with self._tx() as s:
            row = s.get(ModelRow, (model.name, model.version))
            if row is not None:
                if row.manifest_digest == model.manifest_digest:
                    return _model(row)
                raise AlreadyExists(
                    f"model {model.name}:{model.version} was pushed before with another "
                    f"manifest ({row.manifest_digest[:19]}…); give the new bundle a new version"
                )
            s.add(
                ModelRow(
                    name=model.name,
                    version=model.version,
                    manifest_digest=model.manifest_digest,
                    signature_digest=model.signature_digest,
                    size_bytes=model.size_bytes,
                    pushed_at=model.pushed_at,
                    manifest=model.manifest,
                )
            )
        return model

    def get_model(self, name: str, version: str) -> ModelRecord:
        with self._tx() as s:
            row = s.get(ModelRow, (name, version))
            if row is None:
                raise NotFound(f"no model {name}:{version} was pushed")
            return _model(row)

    def list_models(self, name: str = "") -> list[ModelRecord]:
        query = select(ModelRow).order_by(ModelRow.name, ModelRow.pushed_at)
        if name:
            query = query.where(ModelRow.name == name)
        with self._tx() as s:
            return [_model(r) for r in s.scalars(query).all()]

    # ---- desired state ----
    def set_desired(self, desired: Sequence[DesiredModel]) -> None:
        with self._tx() as s:
            for d in desired:
                row = s.get(DesiredModelRow, d.device_id, with_for_update=True)
                if row is None:
                    row = DesiredModelRow(device_id=d.device_id)
                    s.add(row)
                row.model_name = d.model_name
                row.model_version = d.model_version
                row.manifest_digest = d.manifest_digest
                row.signature_digest = d.signature_digest
                row.rollout_id = d.rollout_id
                row.shadow = d.shadow
                row.updated_at = d.updated_at

    def get_desired(self, device_id: str) -> DesiredModel | None:
        with self._tx() as s:
            row = s.get(DesiredModelRow, device_id)
            if row is None:
                return None
            return DesiredModel(
                device_id=row.device_id,
                model_name=row.model_name,
                model_version=row.model_version,
                manifest_digest=row.manifest_digest,
                signature_digest=row.signature_digest,
                rollout_id=row.rollout_id,
                shadow=row.shadow,
                updated_at=row.updated_at,
            )

    # ---- rollouts ----
    def create_rollout(self, rollout: RolloutRecord, targets: Sequence[RolloutTarget]) -> None:
        ids = [t.device_id for t in targets]
        with self._tx() as s:
            busy = s.execute(
                select(RolloutTargetRow.device_id, RolloutTargetRow.rollout_id).where(
                    RolloutTargetRow.active.is_(True), RolloutTargetRow.device_id.in_(ids)
                )
            ).first()
            if busy is not None:
                name = self._device_row(s, busy[0]).name
                raise FailedPrecondition(
                    f"device '{name}' is in active rollout {busy[1]}; abort it or wait for it "
                    "to finish (one active rollout per device)"
                )
            s.add(RolloutRow(id=rollout.id, **_rollout_columns(rollout)))
            s.add_all(
                RolloutTargetRow(
                    rollout_id=t.rollout_id, device_id=t.device_id, **_target_values(t, True)
                )
                for t in targets
            )

    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        with self._tx() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFound(f"no rollout with id '{rollout_id}'")
            return _rollout(row)

    def list_rollouts(self, active_only: bool = False) -> list[RolloutRecord]:
        query = select(RolloutRow).order_by(RolloutRow.created_at.desc())
        if active_only:
            query = query.where(
                RolloutRow.state.in_([RolloutState.RUNNING.value, RolloutState.PAUSED.value])
            )
        with self._tx() as s:
            return [_rollout(r) for r in s.scalars(query).all()]

    def save_rollout(self, rollout: RolloutRecord, targets: Sequence[RolloutTarget] = ()) -> None:
        with self._tx() as s:
            row = s.get(RolloutRow, rollout.id, with_for_update=True)
            if row is None:
                raise NotFound(f"no rollout with id '{rollout.id}'")
            for key, value in _rollout_columns(rollout).items():
                setattr(row, key, value)
            active = rollout.state.active
            for t in targets:
                _update_target(s, t, active)
            if not active:
                s.execute(
                    update(RolloutTargetRow)
                    .where(RolloutTargetRow.rollout_id == rollout.id)
                    .values(active=False)
                )

    def rollout_targets(self, rollout_id: str) -> list[RolloutTarget]:
        query = (
            select(RolloutTargetRow)
            .where(RolloutTargetRow.rollout_id == rollout_id)
            .order_by(RolloutTargetRow.wave, RolloutTargetRow.device_id)
        )
        with self._tx() as s:
            return [_target(r) for r in s.scalars(query).all()]

    # ---- operators ----
    def add_operator(self, name: str, token_hash: str, now: dt.datetime) -> OperatorRecord:
        row = OperatorRow(id=str(uuid.uuid4()), name=name, token_hash=token_hash, created_at=now)
        try:
            with self._tx() as s:
                s.add(row)
        except SAIntegrityError:
            raise AlreadyExists(f"an operator named '{name}' exists already") from None
        return _operator(row)

    def operator_by_token_hash(self, token_hash: str) -> OperatorRecord:
        with self._tx() as s:
            row = s.scalars(select(OperatorRow).where(OperatorRow.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None:
                raise Unauthenticated("the operator token is not valid")
            return _operator(row)

    def close(self) -> None:
        self.engine.dispose()


def _device(row: DeviceRow) -> DeviceRecord:
    return DeviceRecord(
        id=row.id,
        name=row.name,
        labels=dict(row.labels),
        profile=row.profile,
        state=DeviceState(row.state),
        created_at=row.created_at,
        enrolled_at=row.enrolled_at,
        revoked_at=row.revoked_at,
        revoked_reason=row.revoked_reason,
        cert_serial=row.cert_serial,
        cert_fingerprint=row.cert_fingerprint,
        last_seen=row.last_seen,
        session_open=row.session_open,
        agent_version=row.agent_version,
        status=dict(row.status or {}),
        host=dict(row.host or {}),
    )


def _operator(row: OperatorRow) -> OperatorRecord:
    return OperatorRecord(
        id=row.id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at
    )


def _prediction_row(p: PredictionRecord, now: dt.datetime) -> PredictionRow:
    return PredictionRow(
        device_id=p.device_id,
        sequence=p.sequence,
        asset=p.asset,
        window_start=p.window_start,
        window_end=p.window_end,
        score=p.score,
        anomalous=p.anomalous,
        model_version=p.model_version,
        contributions=dict(p.contributions),
        received_at=now,
    )


def _prediction(r: PredictionRow) -> PredictionRecord:
    return PredictionRecord(
        device_id=r.device_id,
        sequence=r.sequence,
        asset=r.asset,
        window_start=r.window_start,
        window_end=r.window_end,
        score=r.score,
        anomalous=r.anomalous,
        model_version=r.model_version,
        contributions=dict(r.contributions),
    )


def _alert_row(a: AlertEventRecord, now: dt.datetime) -> AlertEventRow:
    return AlertEventRow(
        device_id=a.device_id,
        sequence=a.sequence,
        alert_key=a.alert_key,
        kind=a.kind,
        asset=a.asset,
        fault=a.fault,
        score=a.score,
        top_sensors=[[name, value] for name, value in a.top_sensors],
        window_start=a.window_start,
        window_end=a.window_end,
        raised_at=a.raised_at,
        model_version=a.model_version,
        received_at=now,
    )


def _alert(r: AlertEventRow) -> AlertEventRecord:
    return AlertEventRecord(
        device_id=r.device_id,
        sequence=r.sequence,
        alert_key=r.alert_key,
        kind=r.kind,
        asset=r.asset,
        fault=r.fault,
        score=r.score,
        top_sensors=[(str(name), float(value)) for name, value in r.top_sensors],
        window_start=r.window_start,
        window_end=r.window_end,
        raised_at=r.raised_at,
        model_version=r.model_version,
    )


def _model(r: ModelRow) -> ModelRecord:
    return ModelRecord(
        name=r.name,
        version=r.version,
        manifest_digest=r.manifest_digest,
        signature_digest=r.signature_digest,
        size_bytes=r.size_bytes,
        pushed_at=r.pushed_at,
        manifest=dict(r.manifest),
    )


def _when(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_when(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _rollout_columns(r: RolloutRecord) -> dict[str, Any]:
    waves = [
        {
            "index": w.index,
            "size": w.size,
            "target": w.target,
            "started_at": _when(w.started_at),
            "installed_at": _when(w.installed_at),
            "soak_until": _when(w.soak_until),
            "promoted_at": _when(w.promoted_at),
        }
        for w in r.waves
    ]
    return {
        "model_name": r.model_name,
        "model_version": r.model_version,
        "selector": r.selector,
        "state": r.state.value,
        "doc": {
            "waves": waves,
            "current_wave": r.current_wave,
            "soak_s": r.soak_s,
            "gates": dataclasses.asdict(r.gates),
        },
        "reason": r.reason,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }


def _rollout(r: RolloutRow) -> RolloutRecord:
    doc = r.doc
    waves = tuple(
        Wave(
            index=int(w["index"]),
            size=str(w["size"]),
            target=int(w["target"]),
            started_at=_parse_when(w["started_at"]),
            installed_at=_parse_when(w["installed_at"]),
            soak_until=_parse_when(w["soak_until"]),
            promoted_at=_parse_when(w["promoted_at"]),
        )
        for w in doc["waves"]
    )
    return RolloutRecord(
        id=r.id,
        model_name=r.model_name,
        model_version=r.model_version,
        selector=r.selector,
        state=RolloutState(r.state),
        waves=waves,
        current_wave=int(doc["current_wave"]),
        soak_s=float(doc["soak_s"]),
        gates=Gates(**doc["gates"]),
        reason=r.reason,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _update_target(s: Session, t: RolloutTarget, active: bool) -> None:
    row = s.get(RolloutTargetRow, (t.rollout_id, t.device_id), with_for_update=True)
    if row is None:
        raise NotFound(f"device {t.device_id} is not a target of rollout {t.rollout_id}")
    for key, value in _target_values(t, active).items():
        setattr(row, key, value)


def _target_values(t: RolloutTarget, active: bool) -> dict[str, Any]:
    return {
        "wave": t.wave,
        "state": t.state.value,
        "active": active,
        "doc": {
            "detail": t.detail,
            "previous_version": t.previous_version,
            "previous_name": t.previous_name,
            "errors_at_install": t.errors_at_install,
            "shadow": t.shadow,
        },
        "updated_at": t.updated_at or dt.datetime.now(dt.UTC),
    }


def _target(r: RolloutTargetRow) -> RolloutTarget:
    doc = r.doc
    return RolloutTarget(
        rollout_id=r.rollout_id,
        device_id=r.device_id,
        wave=r.wave,
        state=TargetState(r.state),
        detail=str(doc.get("detail", "")),
        previous_version=str(doc.get("previous_version", "")),
        previous_name=str(doc.get("previous_name", "")),
        errors_at_install=int(doc.get("errors_at_install", -1)),
        shadow=dict(doc.get("shadow", {})),
        updated_at=r.updated_at,
    )


def _redact(url: str) -> str:
    """Hides a password in a database URL before it goes into a message."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        user = rest.split("@", 1)[0].split(":", 1)[0]
        rest = f"{user}:***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
