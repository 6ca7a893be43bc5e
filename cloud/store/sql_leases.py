"""Leases in SQL: the row is locked for the check-and-set, so two replicas cannot both
take an expired lease (PostgreSQL row lock; SQLite serialises writers)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.exc import IntegrityError

from cloud.domain import Lease
from cloud.store.sql_base import SqlBase
from cloud.store.tables import LeaseRow


class LeaseTables(SqlBase):
    def try_lease(self, name: str, holder: str, now: dt.datetime, duration: dt.timedelta) -> Lease:
        """Takes or renews `name` for `holder` when free, expired or already its own; the
        lease as it stands afterwards either way."""
        try:
            with self._tx() as s:
                row = s.get(LeaseRow, name, with_for_update=True)
                if row is None:
                    row = LeaseRow(
                        name=name, holder=holder, expires_at=now + duration, acquired_at=now
                    )
                    s.add(row)
                elif row.holder == holder or row.expires_at <= now:
                    if row.holder != holder:
                        row.holder, row.acquired_at = holder, now
                    row.expires_at = now + duration
                s.flush()
                return Lease(row.name, row.holder, row.expires_at, row.acquired_at)
        except IntegrityError:  # another replica inserted the row first: it holds it
            return self.get_lease(name) or Lease(name, "", now, now)

    def release_lease(self, name: str, holder: str, now: dt.datetime) -> None:
        with self._tx() as s:
            row = s.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder == holder:
                row.expires_at = now

    def get_lease(self, name: str) -> Lease | None:
        with self._tx() as s:
            row = s.get(LeaseRow, name)
            return Lease(row.name, row.holder, row.expires_at, row.acquired_at) if row else None
