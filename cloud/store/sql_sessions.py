"""Session claims in SQL: the device's row is locked while its generation is taken or a
replacement counted, so two replicas never hand out the same generation (PostgreSQL row
lock; SQLite serialises writers)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.session_claims import Replacement, SessionClaim, opened, replaced
from cloud.store.notify import notify, session_topic
from cloud.store.sql_base import SqlBase, id_chunks
from cloud.store.tables import DeviceSessionRow
from edge_agent.errors import NotFound

PEER_CHARS = 300  # DeviceSessionRow.peer
REPLICA_CHARS = 200  # DeviceSessionRow.replica


class SessionTables(SqlBase):
    """The session-claims part of `Store`."""

    def claim_session(
        self, device_id: str, replica: str, peer: str, now: float, replacing: bool
    ) -> tuple[SessionClaim, Replacement | None]:
        try:
            with self._tx() as s:
                row = _locked(s, device_id, create=True)
                if row is None:  # the device deleted between the row's insert and its lock
                    raise NotFound(f"no device with id '{device_id}'")
                claim = opened(_claim(row), device_id, replica[:REPLICA_CHARS], peer[:PEER_CHARS])
                replacement = None
                if replacing:
                    claim, replacement = replaced(claim, now)
                _write(row, claim)
                notify(s, session_topic(device_id, claim.generation, claim.replica))
                return claim, replacement
        except IntegrityError:  # the device's row went meanwhile (foreign key)
            raise NotFound(f"no device with id '{device_id}'") from None

    def count_replacement(self, device_id: str, now: float) -> tuple[SessionClaim, Replacement]:
        with self._tx() as s:
            row = _locked(s, device_id, create=False)
            current = _claim(row) if row is not None else None
            if row is None or current is None:
                raise NotFound(f"device '{device_id}' has no session claim")
            claim, replacement = replaced(current, now)
            _write(row, claim)
            return claim, replacement

    def newest_sessions(self, device_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        found: dict[str, tuple[int, str]] = {}
        columns = DeviceSessionRow.device_id, DeviceSessionRow.generation, DeviceSessionRow.replica
        with self._read_tx() as s:
            for chunk in id_chunks(device_ids):
                query = select(*columns).where(DeviceSessionRow.device_id.in_(chunk))
                found.update((d, (int(g), r)) for d, g, r in s.execute(query).all())
        return found


def _locked(s: Session, device_id: str, create: bool) -> DeviceSessionRow | None:
    """The device's claim row, locked (made at generation 0 first with `create`: two
    replicas claiming a device's first session both lock the one row)."""
    if create:
        dialect = s.get_bind().dialect.name
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        s.execute(
            insert(DeviceSessionRow)
            .values(device_id=device_id, generation=0, replica="", peer="", replaced_at=[])
            .on_conflict_do_nothing(index_elements=["device_id"])
        )
    query = select(DeviceSessionRow).where(DeviceSessionRow.device_id == device_id)
    return s.scalars(query.with_for_update()).first()


def _claim(row: DeviceSessionRow) -> SessionClaim | None:
    if not row.generation:
        return None  # just made: no session opened yet
    return SessionClaim(
        device_id=row.device_id,
        generation=int(row.generation),
        replica=row.replica,
        peer=row.peer,
        replaced_at=tuple(float(t) for t in row.replaced_at or ()),
        flapping_at=row.flapping_at,
    )


def _write(row: DeviceSessionRow, claim: SessionClaim) -> None:
    row.generation = claim.generation
    row.replica, row.peer = claim.replica, claim.peer
    row.replaced_at = list(claim.replaced_at)
    row.flapping_at = claim.flapping_at
