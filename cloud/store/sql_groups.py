"""Enrollment groups: one token, up to N devices that name themselves at enrollment."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from cloud.domain import DeviceRecord, DeviceState, EnrollmentGroup
from cloud.store.notify import DEVICES, notify
from cloud.store.sql_base import SqlBase, _device, new_device_row
from cloud.store.tables import DeviceRow, EnrollmentGroupRow
from edge_agent.errors import AlreadyExists, NotFound, PermissionDenied, Unauthenticated

T = TypeVar("T")


def _group(row: EnrollmentGroupRow) -> EnrollmentGroup:
    return EnrollmentGroup(
        name=row.name,
        labels=dict(row.labels),
        profile=row.profile,
        max_uses=row.max_uses,
        uses=row.uses,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


class GroupTables(SqlBase):
    def create_enrollment_group(self, group: EnrollmentGroup, token_hash: str) -> EnrollmentGroup:
        row = EnrollmentGroupRow(
            name=group.name,
            token_hash=token_hash,
            labels=dict(group.labels),
            profile=group.profile,
            max_uses=group.max_uses,
            uses=0,
            created_at=group.created_at,
            expires_at=group.expires_at,
            revoked_at=None,
        )
        try:
            with self._tx() as s:
                s.add(row)
        except SAIntegrityError:
            raise AlreadyExists(f"an enrollment group named '{group.name}' exists") from None
        return _group(row)

    def list_enrollment_groups(self) -> list[EnrollmentGroup]:
        with self._tx() as s:
            rows = s.scalars(select(EnrollmentGroupRow).order_by(EnrollmentGroupRow.name))
            return [_group(r) for r in rows]

    def revoke_enrollment_group(self, name: str, now: dt.datetime) -> EnrollmentGroup:
        """Its token enrolls no more devices (those enrolled stay); idempotent."""
        with self._tx() as s:
            row = s.get(EnrollmentGroupRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"no enrollment group named '{name}'")
            if row.revoked_at is None:
                row.revoked_at = now
            return _group(row)

    def enroll_in_group(
        self,
        token_hash: str,
        device_name: str,
        now: dt.datetime,
        issue: Callable[[DeviceRecord], T],
        activate: Callable[[T], tuple[str, str, dt.datetime]],
    ) -> tuple[DeviceRecord, T]:
        """Creates the device `device_name` in the group of the token, active with its
        certificate, and counts the use; all or nothing."""
        try:
            with self._tx() as s:
                row = s.scalars(
                    select(EnrollmentGroupRow)
                    .where(EnrollmentGroupRow.token_hash == token_hash)
                    .with_for_update()
                ).first()
                if row is None:
                    raise Unauthenticated("unknown enrollment token")
                if row.revoked_at is not None:
                    raise PermissionDenied(f"enrollment group '{row.name}' was revoked")
                if row.expires_at <= now:
                    raise PermissionDenied(
                        f"enrollment group '{row.name}' expired at {row.expires_at.isoformat()}"
                    )
                if row.uses >= row.max_uses:
                    raise PermissionDenied(
                        f"enrollment group '{row.name}' has enrolled its {row.max_uses} device(s)"
                    )
                taken = s.scalars(select(DeviceRow.id).where(DeviceRow.name == device_name)).first()
                if taken is not None:
                    raise AlreadyExists(
                        f"a device named '{device_name}' exists already; enroll this one under "
                        "another name, or delete the old device first"
                    )
                group = _group(row)
                device = new_device_row(
                    device_name, group.labels_for(device_name), group.profile, now
                )
                issued = issue(_device(device))
                serial, fingerprint, not_after = activate(issued)
                device.state = DeviceState.ACTIVE.value
                device.enrolled_at = now
                device.cert_serial = serial
                device.cert_fingerprint = fingerprint
                device.cert_not_after = not_after
                s.add(device)
                # Conditional, so uses are never exceeded under concurrent enrollments (also
                # on SQLite, where the row lock above is not taken).
                counted = s.execute(
                    update(EnrollmentGroupRow)
                    .where(
                        EnrollmentGroupRow.name == row.name,
                        EnrollmentGroupRow.uses < EnrollmentGroupRow.max_uses,
                        EnrollmentGroupRow.revoked_at.is_(None),
                    )
                    .values(uses=EnrollmentGroupRow.uses + 1)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if counted != 1:
                    raise PermissionDenied(
                        f"enrollment group '{row.name}' has enrolled its {row.max_uses} device(s)"
                    )
                notify(s, DEVICES)
        except SAIntegrityError:  # the same name enrolled concurrently
            raise AlreadyExists(f"a device named '{device_name}' exists already") from None
        return _device(device), issued
