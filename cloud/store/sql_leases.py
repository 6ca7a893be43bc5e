"""Leases in SQL: the row is locked for the check-and-set, so two replicas cannot both
take an expired lease (PostgreSQL row lock; SQLite serialises writers). Without a time from
the caller, a lease is taken, renewed, judged expired and released on the database's clock
(PostgreSQL's `now()`; SQLite's file is on this machine, whose clock is its clock): replicas'
clocks that disagree never let one take a healthy leader's lease, nor release one into the
future."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.clock import utc_now
from cloud.domain import Lease
from cloud.store.sql_base import SqlBase
from cloud.store.tables import LeaseRow


class LeaseTables(SqlBase):
    def try_lease(
        self, name: str, holder: str, now: dt.datetime | None, duration: dt.timedelta
    ) -> Lease:
        """Takes or renews `name` for `holder` when free, expired or already its own; the
        lease as it stands afterwards either way."""
        try:
            with self._tx() as s:
                now = _database_now(s) if now is None else now
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
            when = utc_now() if now is None else now
            return self.get_lease(name) or Lease(name, "", when, when)

    def release_lease(self, name: str, holder: str, now: dt.datetime | None) -> None:
        with self._tx() as s:
            row = s.get(LeaseRow, name, with_for_update=True)
            if row is not None and row.holder == holder:
                row.expires_at = _database_now(s) if now is None else now

    def get_lease(self, name: str) -> Lease | None:
        with self._tx() as s:
            row = s.get(LeaseRow, name)
            return Lease(row.name, row.holder, row.expires_at, row.acquired_at) if row else None


def _database_now(s: Session) -> dt.datetime:
    """The database's time: PostgreSQL's clock (its transaction's start, read once so the
    check and the expiry written agree); this machine's for SQLite."""
    if s.get_bind().dialect.name != "postgresql":
        return utc_now()
    now = s.execute(select(func.now())).scalar_one()
    assert isinstance(now, dt.datetime) and now.tzinfo is not None, now
    return now.astimezone(dt.UTC)
