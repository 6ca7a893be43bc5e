"""Captured windows in SQL: each device's daily budget, listing for export, and the verdicts
that label them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud import capture_budget
from cloud.capture_budget import CaptureBudget, CaptureUsage, capture_bytes, utc_day
from cloud.captures import (
    PAGE_BYTES,
    CaptureCalibration,
    CaptureFilter,
    CaptureLabel,
    CaptureRecord,
    held_bytes,
)
from cloud.store.sql_base import SqlBase, id_chunks
from cloud.store.tables import AlertRow, CaptureDayRow, CaptureRow, DeviceRow
from edge_agent.errors import NotFound

_STREAMED = {"yield_per": 4}  # rows decoded at a time: a largest holds 4 MiB


class CaptureTables(SqlBase):
    """The captured-windows part of `Store` (stored by `RecordTables.store_records`)."""

    def charge_captures(
        self,
        device_id: str,
        captures: Sequence[CaptureRecord],
        now: dt.datetime,
        budget: CaptureBudget | None = None,
    ) -> dict[int, str]:
        if not captures:
            return {}
        with self._tx() as s:
            return charge_in(s, device_id, captures, now, budget)

    def list_captures(
        self,
        where: CaptureFilter,
        after: tuple[str, int] = ("", 0),
        limit: int = 200,
        max_bytes: int = PAGE_BYTES,
    ) -> list[CaptureRecord]:
        device, sequence = after
        query = select(CaptureRow).where(
            CaptureRow.window_end >= where.since,
            or_(
                CaptureRow.device_id > device,
                and_(CaptureRow.device_id == device, CaptureRow.sequence > sequence),
            ),
        )
        query = query.order_by(CaptureRow.device_id, CaptureRow.sequence)
        # In IN lists of ID_CHUNK, in id order: the chunks' pages, one after another, are
        # the page in (device id, sequence) order. Devices before the cursor have none left.
        chunks: Iterable[Sequence[str] | None] = [None]
        if where.device_ids is not None:
            chunks = id_chunks(sorted({d for d in where.device_ids if d >= device}))
        found: list[CaptureRecord] = []
        held = 0
        with self._read_tx() as s:
            for chunk in chunks:
                page = query if chunk is None else query.where(CaptureRow.device_id.in_(chunk))
                # Rows a few at a time (a server-side cursor on PostgreSQL), so the page
                # ends at max_bytes without the rows after it read.
                rows = s.scalars(page.limit(limit - len(found)), execution_options=_STREAMED)
                for row in rows:
                    capture = _capture(row)
                    size = held_bytes(capture)
                    if found and held + size > max_bytes:
                        return found  # it starts the next page
                    found.append(capture)
                    held += size
                if len(found) >= limit:
                    break
        return found

    def capture_labels(
        self, device_id: str, alert_keys: Sequence[str], since: dt.datetime
    ) -> dict[str, CaptureLabel]:
        wanted = set(alert_keys)
        if not wanted:
            return {}
        query = select(AlertRow.id, AlertRow.doc).where(
            AlertRow.device_id == device_id, AlertRow.last_seen >= since
        )
        found: dict[str, CaptureLabel] = {}
        with self._tx() as s:
            for alert_id, doc in s.execute(query).all():
                # An alert keeps the edge keys of its last 20 raises (`apply_alert_events`).
                for key in wanted.intersection(doc.get("edge_keys", [])):
                    found[key] = CaptureLabel(
                        alert_id,
                        str(doc.get("verdict", "")),
                        str(doc.get("fault_type", "")),
                    )
        return found


def charge_in(
    s: Session,
    device_id: str,
    captures: Sequence[CaptureRecord],
    now: dt.datetime,
    budget: CaptureBudget | None = None,
) -> dict[int, str]:
    """`charge_captures` in the transaction of `s`: the day row stays locked until it ends,
    and a rollback (the captures not stored after all) undoes the charge with it."""
    if not captures:
        return {}
    budget = budget or capture_budget.DAY_BUDGET
    day = utc_day(now)
    row = _day_row(s, device_id, day)  # locked: a device's batches charge one by one
    stored: set[int] = set()
    for chunk in id_chunks(sorted({c.sequence for c in captures})):
        query = select(CaptureRow.sequence).where(
            CaptureRow.device_id == device_id, CaptureRow.sequence.in_(chunk)
        )
        stored.update(s.scalars(query).all())
    usage = CaptureUsage(day)
    if row.day == day:
        usage = CaptureUsage(day, row.captures, row.bytes, row.refused)
    wanted = [
        (c.sequence, capture_bytes(c))
        for c in sorted(captures, key=lambda c: c.sequence)
        if c.sequence not in stored
    ]
    usage, refused = capture_budget.charge(device_id, usage, wanted, budget)
    row.day, row.captures, row.bytes, row.refused = (
        usage.day,
        usage.captures,
        usage.bytes,
        usage.refused,
    )
    return refused


def _capture(r: CaptureRow) -> CaptureRecord:
    return CaptureRecord(
        device_id=r.device_id,
        sequence=r.sequence,
        reason=r.reason,
        asset=r.asset,
        model_version=r.model_version,
        alert_key=r.alert_key,
        score=r.score,
        window_start=r.window_start,
        period_s=r.period_s,
        length=r.length,
        sensors=tuple(str(x) for x in r.sensors),
        values=bytes(r.values),
        mask=bytes(r.mask),
        input_center=tuple(float(x) for x in r.input_center),
        input_scale=tuple(float(x) for x in r.input_scale),
        received_at=r.received_at,
        calibration=None if r.calibration is None else CaptureCalibration.from_doc(r.calibration),
    )


def _day_row(s: Session, device_id: str, day: int) -> CaptureDayRow:
    """The device's budget row, locked for this transaction (made for `day` if it has none)."""
    row = s.get(CaptureDayRow, device_id, with_for_update=True)
    if row is not None:
        return row
    if s.get(DeviceRow, device_id) is None:
        raise NotFound(f"no device with id '{device_id}'")
    insert = postgresql_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    first = {"device_id": device_id, "day": day, "captures": 0, "bytes": 0, "refused": 0}
    s.execute(insert(CaptureDayRow).values(first).on_conflict_do_nothing())
    row = s.get(CaptureDayRow, device_id, with_for_update=True, populate_existing=True)
    assert row is not None  # inserted above, or by a transaction that committed first
    return row
