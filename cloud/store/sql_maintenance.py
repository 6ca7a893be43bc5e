"""Maintenance windows in SQL. Windows that ended stay listed (`include_ended`) for the
record; the webhook senders' sweep (once per interval for the fleet, by the replica holding
the sweep lease; any replica at once when windows change through it) releases the alerts
they held back (`release_suppressed`)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from cloud.maintenance import MaintenanceWindow
from cloud.store.sql_base import SqlBase
from cloud.store.tables import MaintenanceRow
from edge_agent.errors import NotFound


def windows_in_force(s: Session, now: dt.datetime) -> list[MaintenanceWindow]:
    """Windows that have not ended (active now or later)."""
    query = select(MaintenanceRow).where(
        or_(MaintenanceRow.ends_at.is_(None), MaintenanceRow.ends_at > now)
    )
    return [_window(r) for r in s.scalars(query.order_by(MaintenanceRow.created_at)).all()]


class MaintenanceTables(SqlBase):
    """The maintenance part of `Store`."""

    def add_maintenance(
        self,
        selector: str,
        asset: str,
        starts_at: dt.datetime,
        ends_at: dt.datetime | None,
        reason: str,
        by: str,
        now: dt.datetime,
    ) -> MaintenanceWindow:
        row = MaintenanceRow(
            id=str(uuid.uuid4()),
            selector=selector,
            asset=asset,
            starts_at=starts_at,
            ends_at=ends_at,
            reason=reason,
            created_by=by,
            created_at=now,
        )
        with self._tx() as s:
            s.add(row)
            s.flush()
            return _window(row)

    def list_maintenance(self, now: dt.datetime, include_ended: bool) -> list[MaintenanceWindow]:
        with self._tx() as s:
            if not include_ended:
                return windows_in_force(s, now)
            rows = s.scalars(select(MaintenanceRow).order_by(MaintenanceRow.created_at)).all()
            return [_window(r) for r in rows]

    def remove_maintenance(self, window_id: str) -> MaintenanceWindow:
        with self._tx() as s:
            row = s.get(MaintenanceRow, window_id)
            if row is None and len(window_id) >= 4:  # as `maintenance list` shows ids shortened
                ids = s.scalars(
                    select(MaintenanceRow.id)
                    .where(MaintenanceRow.id.startswith(window_id, autoescape=True))
                    .limit(2)
                ).all()
                row = s.get(MaintenanceRow, ids[0]) if len(ids) == 1 else None
            if row is None:
                raise NotFound(f"no maintenance window with id '{window_id}'")
            removed = _window(row)
            s.delete(row)
            return removed


def _window(r: MaintenanceRow) -> MaintenanceWindow:
    return MaintenanceWindow(
        id=r.id,
        selector=r.selector,
        asset=r.asset,
        starts_at=r.starts_at,
        ends_at=r.ends_at,
        reason=r.reason,
        created_by=r.created_by,
        created_at=r.created_at,
    )
