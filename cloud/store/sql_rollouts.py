"""Pushed models, desired models and rollouts in SQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud.domain import (
    DesiredModel,
    Gates,
    ModelRecord,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetState,
    Wave,
)
from cloud.store.notify import DESIRED, notify
from cloud.store.sql_base import ROLLOUT_LOCK, SqlBase, id_chunks
from cloud.store.tables import (
    DesiredModelRow,
    DesiredRevisionRow,
    ModelRow,
    RolloutRow,
    RolloutTargetRow,
)
from edge_agent.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    NotFound,
)


class RolloutTables(SqlBase):
    """The model and rollout part of `Store`."""

    def add_model(self, model: ModelRecord) -> ModelRecord:
        with self._tx() as s:
            # Inserted unless there: two replicas registering one bundle at once both end
            # here, one inserts and the other reads the row (no IntegrityError between them).
            insert = (
                postgresql_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
            )
            inserted = s.execute(
                insert(ModelRow)
                .values(
                    name=model.name,
                    version=model.version,
                    manifest_digest=model.manifest_digest,
                    signature_digest=model.signature_digest,
                    size_bytes=model.size_bytes,
                    pushed_at=model.pushed_at,
                    manifest=model.manifest,
                )
                .on_conflict_do_nothing(index_elements=["name", "version"])
            )
            if inserted.rowcount == 1:  # type: ignore[attr-defined]
                return model
            row = s.get(ModelRow, (model.name, model.version))
            if row is None:  # deleted since the insert found it
                raise Conflict(f"model {model.name}:{model.version} changed meanwhile; try again")
            if row.manifest_digest == model.manifest_digest:
                return _model(row)
            raise AlreadyExists(
                f"model {model.name}:{model.version} was pushed before with another "
                f"manifest ({row.manifest_digest[:19]}…); give the new bundle a new version"
            )

    def get_model(self, name: str, version: str) -> ModelRecord:
        with self._tx() as s:
            row = s.get(ModelRow, (name, version))
            if row is None:
                raise NotFound(f"no model {name}:{version} was pushed")
            return _model(row)

    def delete_model(self, name: str, version: str) -> ModelRecord:
        with self._tx() as s:
            row = s.get(ModelRow, (name, version), with_for_update=True)
            if row is None:
                raise NotFound(f"no model {name}:{version} was pushed")
            assigned = s.scalars(
                select(func.count())
                .select_from(DesiredModelRow)
                .where(DesiredModelRow.model_name == name, DesiredModelRow.model_version == version)
            ).one()
            if assigned:
                raise FailedPrecondition(
                    f"model {name}:{version} is the desired version of {assigned} device(s); "
                    "roll another version out to them first"
                )
            rollout = s.scalars(
                select(RolloutRow.id).where(
                    RolloutRow.model_name == name,
                    RolloutRow.model_version == version,
                    RolloutRow.state.in_([RolloutState.RUNNING.value, RolloutState.PAUSED.value]),
                )
            ).first()
            if rollout is not None:
                raise FailedPrecondition(
                    f"model {name}:{version} is being rolled out ({rollout}); abort it first"
                )
            model = _model(row)
            s.delete(row)
            return model

    def list_models(self, name: str = "") -> list[ModelRecord]:
        query = select(ModelRow).order_by(ModelRow.name, ModelRow.pushed_at)
        if name:
            query = query.where(ModelRow.name == name)
        with self._tx() as s:
            return [_model(r) for r in s.scalars(query).all()]

    # ---- desired state ----
    def set_desired(self, desired: Sequence[DesiredModel]) -> list[DesiredModel]:
        with self._tx() as s:
            return _write_desired(s, desired)

    def get_desired(self, device_id: str) -> DesiredModel | None:
        with self._tx() as s:
            row = s.get(DesiredModelRow, device_id)
            return _desired(row) if row is not None else None

    def desired_for(self, device_ids: Sequence[str]) -> dict[str, DesiredModel]:
        found: dict[str, DesiredModel] = {}
        with self._tx() as s:
            # In slices, as `device_credentials`: a large fleet's ids would pass the
            # databases' bounds on bound parameters.
            for chunk in id_chunks(device_ids):
                query = select(DesiredModelRow).where(DesiredModelRow.device_id.in_(chunk))
                found.update((r.device_id, _desired(r)) for r in s.scalars(query).all())
        return found

    def desired_after(self, revision: int, limit: int = 500) -> list[DesiredModel]:
        query = (
            select(DesiredModelRow)
            .where(DesiredModelRow.revision > revision)
            .order_by(DesiredModelRow.revision)
            .limit(limit)
        )
        with self._tx() as s:
            return [_desired(r) for r in s.scalars(query).all()]

    def desired_revision(self) -> int:
        with self._tx() as s:
            counter = s.get(DesiredRevisionRow, 1)
            return counter.value if counter is not None else 0

    # ---- rollouts ----
    def create_rollout(self, rollout: RolloutRecord, targets: Sequence[RolloutTarget]) -> None:
        ids = [t.device_id for t in targets]
        with self._tx() as s:
            if s.get_bind().dialect.name == "postgresql":
                # Two replicas' checks below would each find no active target and both insert
                # (READ COMMITTED; nothing to lock yet): one creation at a time, held until
                # commit. SQLite's BEGIN IMMEDIATE serialises it already.
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ROLLOUT_LOCK})
            busy = _first_in_active_rollout(s, ids)
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
        with self._read_tx() as s:  # also a device's report on any id: no write lock
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

    def save_rollout(
        self,
        rollout: RolloutRecord,
        targets: Sequence[RolloutTarget] = (),
        desired: Sequence[DesiredModel] = (),
        *,
        from_shadow: bool = False,
    ) -> tuple[RolloutRecord, list[DesiredModel]]:
        with self._tx() as s:
            row = s.get(RolloutRow, rollout.id, with_for_update=True)
            if row is None:
                raise NotFound(f"no rollout with id '{rollout.id}'")
            if row.revision != rollout.revision:
                raise Conflict(
                    f"rollout {rollout.id} changed since it was read (revision {row.revision}, "
                    f"read at {rollout.revision}; now {row.state})"
                )
            for key, value in _rollout_columns(rollout).items():
                setattr(row, key, value)
            row.revision = rollout.revision + 1
            active = rollout.state.active
            written = _write_desired(s, desired, from_shadow)
            # A device sent back (abort, undo) that another rollout took since it was read
            # keeps what that rollout gave it, and its target here stays as it was.
            taken = {d.device_id for d in desired} - {d.device_id for d in written}
            for t in targets:
                if t.device_id not in taken:
                    _update_target(s, t, active)
            if not active:
                s.execute(
                    update(RolloutTargetRow)
                    .where(RolloutTargetRow.rollout_id == rollout.id)
                    .values(active=False)
                )
            return dataclasses.replace(rollout, revision=row.revision), written

    def record_shadow(
        self, rollout_id: str, device_id: str, shadow: dict[str, Any], enough: int = 1
    ) -> bool:
        with self._tx() as s:
            row = s.get(RolloutTargetRow, (rollout_id, device_id), with_for_update=True)
            if row is None:
                raise NotFound(f"device {device_id} is not a target of rollout {rollout_id}")
            stored = int(row.doc.get("shadow", {}).get("windows", 0))
            windows = int(shadow.get("windows", 0))
            if windows < stored and windows < enough:
                return False
            row.doc = {**row.doc, "shadow": dict(shadow)}
            return True

    def save_target(self, target: RolloutTarget) -> RolloutTarget:
        with self._tx() as s:
            row = _update_target(s, target, None)
            return dataclasses.replace(target, revision=row.revision)

    def rollout_targets(self, rollout_id: str) -> list[RolloutTarget]:
        query = (
            select(RolloutTargetRow)
            .where(RolloutTargetRow.rollout_id == rollout_id)
            .order_by(RolloutTargetRow.wave, RolloutTargetRow.device_id)
        )
        with self._tx() as s:
            return [_target(r) for r in s.scalars(query).all()]

    def rollout_target(self, rollout_id: str, device_id: str) -> RolloutTarget | None:
        with self._read_tx() as s:
            row = s.get(RolloutTargetRow, (rollout_id, device_id))
            return _target(row) if row is not None else None


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
        revision=r.revision,
    )


def _update_target(s: Session, t: RolloutTarget, active: bool | None) -> RolloutTargetRow:
    """Compare-and-set of one target; `active` None keeps the row's. The shadow report stays
    the row's: `record_shadow` replaces it without a revision bump, so the one `t` was read
    with may be older than the stored one."""
    row = s.get(RolloutTargetRow, (t.rollout_id, t.device_id), with_for_update=True)
    if row is None:
        raise NotFound(f"device {t.device_id} is not a target of rollout {t.rollout_id}")
    if row.revision != t.revision:
        raise Conflict(
            f"target {t.device_id} of rollout {t.rollout_id} changed since it was read "
            f"(now {row.state}, revision {row.revision}; read at {t.revision})"
        )
    values = _target_values(t, row.active if active is None else active)
    values["doc"]["shadow"] = dict(row.doc.get("shadow", {}))
    for key, value in values.items():
        setattr(row, key, value)
    row.revision = t.revision + 1
    return row


def _write_desired(
    s: Session, desired: Sequence[DesiredModel], from_shadow: bool = False
) -> list[DesiredModel]:
    """Replaces each device's desired state, each taking the next feed revision. The counter
    row stays locked until commit, so revisions become visible in the order they are taken
    and a reader following them never skips one. With `from_shadow`, each replaces only its
    device's shadow state of the same rollout (compare-and-set on the locked row): Conflict
    otherwise."""
    if not desired:
        return []
    counter = s.get(DesiredRevisionRow, 1, with_for_update=True)
    assert counter is not None, "migration 0008 creates the counter row"
    written = []
    for d in desired:
        row = s.get(DesiredModelRow, d.device_id, with_for_update=True)
        if d.revert_version and row is not None and row.rollout_id != d.rollout_id:
            continue  # a send-back, but another rollout owns the device now
        if from_shadow and (row is None or row.rollout_id != d.rollout_id or not row.shadow):
            found = f"{row.model_version} of rollout {row.rollout_id}" if row else "none"
            raise Conflict(
                f"device {d.device_id}'s desired state changed since it was read (now {found}, "
                f"not rollout {d.rollout_id}'s shadow one)"
            )
        counter.value += 1
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
        row.revert_version = d.revert_version
        row.revision = counter.value
        written.append(dataclasses.replace(d, revision=counter.value))
    notify(s, DESIRED)  # every replica's feed reads it at once, not at its next poll
    return written


def _desired(row: DesiredModelRow) -> DesiredModel:
    return DesiredModel(
        device_id=row.device_id,
        model_name=row.model_name,
        model_version=row.model_version,
        manifest_digest=row.manifest_digest,
        signature_digest=row.signature_digest,
        rollout_id=row.rollout_id,
        shadow=row.shadow,
        updated_at=row.updated_at,
        revert_version=row.revert_version or "",
        revision=row.revision,
    )


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
        revision=r.revision,
    )


def _first_in_active_rollout(s: Session, ids: Sequence[str]) -> tuple[str, str] | None:
    """(device id, rollout id) of one of the devices in an active rollout, if any; the ids
    in chunks, however many the rollout targets."""
    for chunk in id_chunks(ids):
        busy = s.execute(
            select(RolloutTargetRow.device_id, RolloutTargetRow.rollout_id).where(
                RolloutTargetRow.active.is_(True), RolloutTargetRow.device_id.in_(chunk)
            )
        ).first()
        if busy is not None:
            return busy[0], busy[1]
    return None
