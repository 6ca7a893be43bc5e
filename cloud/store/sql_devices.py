"""Devices, enrollment tokens and presence in SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from cloud.domain import (
    DeviceRecord,
    DeviceState,
    DeviceSummary,
    PresenceUpdate,
)
from cloud.selectors import Selector, matches
from cloud.store.notify import DEVICES, notify
from cloud.store.sql_base import SqlBase, _device, id_chunks, new_device_row
from cloud.store.tables import (
    DeviceRow,
    EnrollmentTokenRow,
    RolloutTargetRow,
)
from edge_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

T = TypeVar("T")
_OPTIONAL_PRESENCE_FIELDS = ("agent_version", "status", "host")


class DeviceTables(SqlBase):
    """The device part of `Store`."""

    # ---- devices ----
    def create_device(
        self, name: str, labels: Mapping[str, str], profile: str, now: dt.datetime
    ) -> DeviceRecord:
        row = new_device_row(name, labels, profile, now)
        try:
            with self._tx() as s:
                s.add(row)
        except SAIntegrityError:
            raise AlreadyExists(f"a device named '{name}' exists already") from None
        return _device(row)

    def get_device(self, id_or_name: str) -> DeviceRecord:
        with self._tx() as s:
            return _device(self._device_row(s, id_or_name))

    def list_devices(self, selector: Selector | Mapping[str, str]) -> list[DeviceRecord]:
        with self._read_tx() as s:
            rows = s.scalars(select(DeviceRow).order_by(DeviceRow.name)).all()
            return [_device(r) for r in rows if matches(r.labels, selector)]

    def device_summaries(self, ids: Collection[str] | None = None) -> list[DeviceSummary]:
        if ids is None:
            return self._summaries(None)
        if isinstance(ids, str):
            raise TypeError("device_summaries takes a collection of ids, not one id")
        wanted = sorted(set(ids))
        found = [  # in chunks: bound parameters per statement stay under SQLite's limit
            d for chunk in id_chunks(wanted) for d in self._summaries(chunk)
        ]
        return sorted(found, key=lambda d: d.name)  # one order, however many chunks

    def _summaries(self, ids: Sequence[str] | None) -> list[DeviceSummary]:
        query = select(
            DeviceRow.id,
            DeviceRow.name,
            DeviceRow.labels,
            DeviceRow.state,
            DeviceRow.session_open,
            DeviceRow.last_seen,
            DeviceRow.cert_not_after,
            DeviceRow.status,
        ).order_by(DeviceRow.name)
        if ids is not None:
            query = query.where(DeviceRow.id.in_(ids))
        with self._tx() as s:
            rows = s.execute(query).all()
        return [
            DeviceSummary(
                row.id,
                row.name,
                dict(row.labels or {}),
                DeviceState(row.state),
                bool(row.session_open),
                row.last_seen,
                row.cert_not_after,
                health if isinstance(health := (row.status or {}).get("health"), dict) else {},
            )
            for row in rows
        ]

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
                notify(s, DEVICES)  # replicas holding its session end it at once
            return _device(row)

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
        activate: Callable[[T], tuple[str, str, dt.datetime]],
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
            serial, fingerprint, not_after = activate(issued)
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
            row.cert_not_after = not_after
            row.previous_fingerprint = ""
            row.previous_valid_until = None
            notify(s, DEVICES)  # a re-enrolled device's old sessions end at once
            return _device(row), issued

    def renew_certificate(
        self,
        device_id: str,
        presented: str,
        now: dt.datetime,
        grace: dt.timedelta,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str, dt.datetime]],
    ) -> tuple[DeviceRecord, T]:
        with self._tx() as s:
            row = s.scalars(
                select(DeviceRow).where(DeviceRow.id == device_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no device with id '{device_id}'")
            device = _device(row)
            if row.state != DeviceState.ACTIVE.value:
                raise PermissionDenied(f"device '{row.name}' may not renew its certificate")
            if not device.accepts(presented, now):
                raise PermissionDenied(
                    f"device '{row.name}' presented a certificate that is no longer current; "
                    "re-enroll the device"
                )
            issued = issue(device)
            serial, fingerprint, not_after = activate(issued)
            if presented == row.cert_fingerprint:  # else: a retry with the one renewed from
                # Accepted until the device first uses the new one (`forget_previous`), at
                # most until it expires itself: an answer lost before a long time offline
                # still lets the device renew again.
                row.previous_fingerprint = row.cert_fingerprint
                row.previous_valid_until = row.cert_not_after or now + grace
            row.cert_serial = serial
            row.cert_fingerprint = fingerprint
            row.cert_not_after = not_after
            return _device(row), issued

    def record_cert_expiry(self, device_id: str, fingerprint: str, not_after: dt.datetime) -> None:
        with self._tx() as s:
            s.execute(
                update(DeviceRow)
                .where(
                    DeviceRow.id == device_id,
                    DeviceRow.cert_fingerprint == fingerprint,
                    DeviceRow.cert_not_after.is_(None),
                )
                .values(cert_not_after=not_after)
            )

    def forget_previous_certificate(self, device_id: str, current: str) -> None:
        with self._tx() as s:
            s.execute(
                update(DeviceRow)
                .where(DeviceRow.id == device_id, DeviceRow.cert_fingerprint == current)
                .values(previous_fingerprint="", previous_valid_until=None)
            )

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

    def delete_device(self, id_or_name: str) -> DeviceRecord:
        with self._tx() as s:
            row = self._device_row(s, id_or_name, for_update=True)
            if row.state == DeviceState.ACTIVE.value:
                raise FailedPrecondition(
                    f"device '{row.name}' is active; revoke it first "
                    f"(autoglm device revoke {row.name}), then delete it"
                )
            busy = s.scalars(
                select(RolloutTargetRow.rollout_id).where(
                    RolloutTargetRow.device_id == row.id, RolloutTargetRow.active.is_(True)
                )
            ).first()
            if busy is not None:
                raise FailedPrecondition(
                    f"device '{row.name}' is in active rollout {busy}; abort it first"
                )
            device = _device(row)
            s.delete(row)  # tokens, records, alerts, targets, desired state: ON DELETE CASCADE
            return device

    def device_credentials(
        self, device_ids: Sequence[str], now: dt.datetime
    ) -> dict[str, tuple[bool, frozenset[str]]]:
        found: dict[str, tuple[bool, frozenset[str]]] = {}
        with self._tx() as s:
            for chunk in id_chunks(device_ids):
                query = select(
                    DeviceRow.id,
                    DeviceRow.state,
                    DeviceRow.cert_fingerprint,
                    DeviceRow.previous_fingerprint,
                    DeviceRow.previous_valid_until,
                ).where(DeviceRow.id.in_(chunk))
                for device_id, state, current, previous, until in s.execute(query).all():
                    valid = {current}
                    if previous and until is not None and now < until:
                        valid.add(previous)
                    found[device_id] = (state == DeviceState.ACTIVE.value, frozenset(valid))
        return found
