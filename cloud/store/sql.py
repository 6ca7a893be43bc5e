"""The SQLAlchemy store: one implementation for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import sessionmaker

from cloud.domain import (
    AuditEntry,
    OperatorRecord,
)
from cloud.store.base import Store
from cloud.store.notify import OPERATORS, ChangeListener, notify
from cloud.store.sql_alerts import AlertTables
from cloud.store.sql_base import READ_ONLY, SqlBase, make_engine, migrate, normalise_url
from cloud.store.sql_captures import CaptureTables
from cloud.store.sql_devices import DeviceTables
from cloud.store.sql_groups import GroupTables
from cloud.store.sql_leases import LeaseTables
from cloud.store.sql_maintenance import MaintenanceTables
from cloud.store.sql_records import RecordTables
from cloud.store.sql_rollouts import RolloutTables
from cloud.store.sql_sessions import SessionTables
from cloud.store.sql_webhooks import WebhookTables
from cloud.store.tables import (
    AlertRow,
    AuditRow,
    DeliveryRow,
    DeviceRow,
    OperatorRow,
    RolloutRow,
)
from edge_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unauthenticated,
)

__all__ = ["SqlStore", "make_engine", "migrate", "normalise_url"]


class SqlStore(
    DeviceTables,
    RecordTables,
    CaptureTables,
    RolloutTables,
    AlertTables,
    WebhookTables,
    MaintenanceTables,
    LeaseTables,
    SessionTables,
    GroupTables,
    SqlBase,
    Store,
):
    """`Store` over SQLAlchemy 2: the table groups (sql_devices, sql_records, sql_rollouts,
    sql_alerts, sql_webhooks, sql_leases) share one engine and transaction helper."""

    @property
    def shared(self) -> bool:
        return not self.url.startswith("sqlite")

    def change_listener(self, on_change: Callable[[str], None]) -> ChangeListener | None:
        return ChangeListener(self.url, on_change) if self.shared else None

    def __init__(self, url: str, run_migrations: bool = True) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        try:
            if run_migrations:
                migrate(self.engine)  # its errors say which step failed and why
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        reading = self.engine.execution_options(**{READ_ONLY: True})
        self._read_sessions = sessionmaker(reading, expire_on_commit=False)

    def state_counts(self) -> dict[str, dict[str, int]]:
        tables: dict[str, Any] = {
            "devices": DeviceRow,
            "rollouts": RolloutRow,
            "alerts": AlertRow,
            "webhook_deliveries": DeliveryRow,
        }
        with self._tx() as s:
            return {
                name: {
                    str(state): int(n)
                    for state, n in s.execute(
                        select(table.state, func.count()).group_by(table.state)
                    )
                }
                for name, table in tables.items()
            }

    # ---- operators ----
    def add_operator(
        self, name: str, token_hash: str, now: dt.datetime, role: str = "admin"
    ) -> OperatorRecord:
        row = OperatorRow(
            id=str(uuid.uuid4()), name=name, token_hash=token_hash, created_at=now, role=role
        )
        try:
            with self._tx() as s:
                s.add(row)
        except SAIntegrityError:
            raise AlreadyExists(f"an operator named '{name}' exists already") from None
        return _operator(row)

    def list_operators(self) -> list[OperatorRecord]:
        with self._tx() as s:
            return [_operator(r) for r in s.scalars(select(OperatorRow).order_by(OperatorRow.name))]

    def revoke_operator(self, name: str, now: dt.datetime) -> OperatorRecord:
        with self._tx() as s:
            # Every active admin locked, in one order, before the operator itself: two
            # revocations at once can neither leave no admin nor lock each other's rows in
            # opposite orders (a deadlock PostgreSQL would end by aborting one).
            admins = s.scalars(
                select(OperatorRow.id)
                .where(OperatorRow.role == "admin", OperatorRow.revoked_at.is_(None))
                .order_by(OperatorRow.id)
                .with_for_update()
            ).all()
            row = s.scalars(
                select(OperatorRow).where(OperatorRow.name == name).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no operator named '{name}'")
            if row.revoked_at is None and row.role == "admin" and len(admins) <= 1:
                raise FailedPrecondition(
                    f"'{name}' is the last admin: add another admin before revoking it"
                )
            if row.revoked_at is None:
                row.revoked_at = now
                notify(s, OPERATORS)  # every replica drops its cached tokens at once
            return _operator(row)

    def add_audit(self, entry: AuditEntry) -> None:
        with self._tx() as s:
            s.add(
                AuditRow(
                    at=entry.at,
                    operator=entry.operator[:128],
                    role=entry.role[:16],
                    method=entry.method[:64],
                    target=entry.target[:512],
                    code=entry.code[:32],
                    detail=entry.detail[:1024],
                )
            )

    def prune_audit(self, before: dt.datetime) -> int:
        with self._tx() as s:
            return int(s.execute(delete(AuditRow).where(AuditRow.at < before)).rowcount)  # type: ignore[attr-defined]

    def list_audit(self, since: dt.datetime | None, operator: str, limit: int) -> list[AuditEntry]:
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if operator:
            query = query.where(AuditRow.operator == operator)
        with self._read_tx() as s:
            return [
                AuditEntry(
                    id=r.id,
                    at=r.at,
                    operator=r.operator,
                    role=r.role,
                    method=r.method,
                    target=r.target,
                    code=r.code,
                    detail=r.detail,
                )
                for r in s.scalars(query)
            ]

    def operator_by_token_hash(self, token_hash: str) -> OperatorRecord:
        with self._read_tx() as s:  # on every call's cache miss: no write lock on SQLite
            row = s.scalars(select(OperatorRow).where(OperatorRow.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None:
                raise Unauthenticated("the operator token is not valid")
            return _operator(row)

    def close(self) -> None:
        self.engine.dispose()


def _operator(row: OperatorRow) -> OperatorRecord:
    return OperatorRecord(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        role=row.role or "admin",
    )
