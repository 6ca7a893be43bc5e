"""Webhooks and the delivery outbox in SQL.

Deliveries are written by `enqueue_deliveries` in the transaction that changes an alert, so
a change is queued exactly when it is committed (a transactional outbox). A sender claims
due deliveries with a lease (SKIP LOCKED where the database has it), so two control-plane
replicas do not send the same one at once; it is marked delivered after a 2xx. A crash
between the POST and the mark sends it again with the same delivery id, which receivers
use to drop the repeat. Per webhook and alert, changes are sent in order; across devices a
claim takes turns (each device's oldest due delivery before any device's second), so one
device's backlog does not hold up another's alerts. A claim can take at most a share of each
webhook's due deliveries (the rest stay unclaimed, their attempts uncounted), and a claimed
delivery not sent is released without its attempt counted.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence

from sqlalchemy import ColumnElement, Subquery, case, delete, func, insert, literal, select
from sqlalchemy.orm import Session, aliased

from cloud.domain import AlertRecord, AlertState
from cloud.store.sql_base import SqlBase, id_chunks
from cloud.store.tables import AlertRow, DeliveryRow, DeviceRow, WebhookRow
from cloud.webhook_records import Delivery, WebhookFilter, WebhookRecord
from edge_agent.errors import NotFound

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"


def enqueue_deliveries(s: Session, alerts: Sequence[AlertRecord], now: dt.datetime) -> int:
    """Queues each changed alert for every webhook whose filter takes it (in `s`'s tx)."""
    if not alerts:
        return 0
    hooks = list(s.scalars(select(WebhookRow)).all())
    if not hooks:
        return 0
    devices: dict[str, tuple[str, dict[str, str]]] = {}
    for chunk in id_chunks(sorted({a.device_id for a in alerts})):  # see ID_CHUNK
        query = select(DeviceRow.id, DeviceRow.name, DeviceRow.labels).where(
            DeviceRow.id.in_(chunk)
        )
        devices.update(
            (device_id, (name, dict(labels or {}))) for device_id, name, labels in s.execute(query)
        )
    filters = {h.id: WebhookFilter.parse(h.filter) for h in hooks}
    rows: list[dict[str, object]] = []
    for alert in alerts:
        name, labels = devices.get(alert.device_id, (alert.device_id, {}))
        # The device's labels ride along: severity rules and Alertmanager labels use them.
        payload = {
            "event": f"alert.{alert.state.value}",
            "alert": alert.to_json(name),
            "device_labels": labels,
        }
        rows += [
            {
                "webhook_id": hook.id,
                "alert_id": alert.id,
                "revision": alert.revision,
                "payload": payload,
                "state": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "last_error": "",
                "created_at": now,
                "delivered_at": None,
            }
            for hook in hooks
            if filters[hook.id].matches(alert, name)
        ]
    if rows:  # one statement (an executemany): a batch's thousands of changes at once
        s.execute(insert(DeliveryRow), rows)
    return len(rows)


class WebhookTables(SqlBase):
    """The webhooks part of `Store`."""

    def add_webhook(
        self, url: str, secret: str, filter_text: str, now: dt.datetime, kind: str = "standard"
    ) -> WebhookRecord:
        WebhookFilter.parse(filter_text)  # InvalidInput names the bad part
        row = WebhookRow(
            id=str(uuid.uuid4()),
            url=url,
            secret=secret,
            filter=filter_text,
            created_at=now,
            kind=kind,
            previous_secret="",
            previous_until=None,
        )
        with self._tx() as s:
            s.add(row)
            s.flush()
            return _webhook(row, {})

    def list_webhooks(self) -> list[WebhookRecord]:
        with self._tx() as s:
            counts: dict[tuple[str, str], int] = {
                (hook, state): n
                for hook, state, n in s.execute(
                    select(DeliveryRow.webhook_id, DeliveryRow.state, func.count()).group_by(
                        DeliveryRow.webhook_id, DeliveryRow.state
                    )
                )
            }
            failing = (
                select(DeliveryRow.webhook_id, DeliveryRow.last_error)
                .where(DeliveryRow.last_error != "")
                .order_by(DeliveryRow.id)
            )
            errors = {hook: error for hook, error in s.execute(failing).all()}
            rows = s.scalars(select(WebhookRow).order_by(WebhookRow.created_at)).all()
            return [_webhook(r, counts, errors.get(r.id, "")) for r in rows]

    def remove_webhook(self, webhook_id: str) -> WebhookRecord:
        with self._tx() as s:
            row = s.get(WebhookRow, webhook_id)
            if row is None:
                raise NotFound(f"no webhook with id '{webhook_id}'")
            removed = _webhook(row, {})
            s.query(DeliveryRow).filter(DeliveryRow.webhook_id == webhook_id).delete()
            s.delete(row)
            return removed

    def rotate_webhook_secret(
        self, webhook_id: str, secret: str, previous_until: dt.datetime
    ) -> WebhookRecord:
        """`secret` signs from now on; the current one signs beside it until `previous_until`."""
        with self._tx() as s:
            row = s.get(WebhookRow, webhook_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no webhook with id '{webhook_id}'")
            row.previous_secret, row.previous_until = row.secret, previous_until
            row.secret = secret
            s.flush()
            return _webhook(row, {})

    def rearm_deliveries(self, kind: str, sent_before: dt.datetime, now: dt.datetime) -> int:
        """Sends again the latest delivered change of every active, undelivered-since alert
        to webhooks of `kind` (Alertmanager wants open alerts repeated, or resolves them);
        alerts held back (shelved, in maintenance) are left to expire there."""
        newer = aliased(DeliveryRow)
        later = (
            select(newer.id)
            .where(
                newer.webhook_id == DeliveryRow.webhook_id,
                newer.alert_id == DeliveryRow.alert_id,
                newer.id > DeliveryRow.id,
            )
            .exists()
        )
        query = (
            select(DeliveryRow, AlertRow)
            .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
            .join(AlertRow, AlertRow.id == DeliveryRow.alert_id)
            .where(
                WebhookRow.kind == kind,
                DeliveryRow.state == DELIVERED,
                DeliveryRow.delivered_at < sent_before,
                AlertRow.state.in_([AlertState.FIRING.value, AlertState.ACKNOWLEDGED.value]),
                ~later,
            )
        )
        with self._tx() as s:
            rearmed = 0
            for row, alert in s.execute(query).all():
                if alert.doc.get("suppressed_by"):
                    continue
                row.state, row.attempts, row.next_attempt_at = PENDING, 0, now
                row.created_at = now
                rearmed += 1
            return rearmed

    def prune_deliveries(self, before: dt.datetime) -> int:
        """Deletes delivered and dead changes queued before `before` of alerts that are closed
        (nothing repeats them any more); how many."""
        closed = select(AlertRow.id).where(
            AlertRow.state.in_([AlertState.RESOLVED.value, AlertState.RETURNED.value])
        )
        with self._tx() as s:
            result = s.execute(
                delete(DeliveryRow).where(
                    DeliveryRow.state.in_([DELIVERED, DEAD]),
                    DeliveryRow.created_at < before,
                    DeliveryRow.alert_id.in_(closed),
                )
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def claim_deliveries(
        self,
        now: dt.datetime,
        lease: dt.timedelta,
        limit: int,
        per_webhook: int | None = None,
        busy: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        """Due deliveries, each the oldest pending one of its webhook and alert, in turns by
        device (`_turns`), at most `per_webhook` of one webhook less its `busy` ones; leased
        until `now + lease` (another sender skips them meanwhile) and counted as attempted."""
        if limit <= 0:
            return []
        earlier = aliased(DeliveryRow)
        older_pending = (
            select(earlier.id)
            .where(
                earlier.webhook_id == DeliveryRow.webhook_id,
                earlier.alert_id == DeliveryRow.alert_id,
                earlier.state == PENDING,
                earlier.id < DeliveryRow.id,
            )
            .exists()
        )
        due = (DeliveryRow.state == PENDING, DeliveryRow.next_attempt_at <= now)
        turns = _turns(due, older_pending, per_webhook, busy or {})
        # The window functions are in a subquery: PostgreSQL locks no rows of a query level
        # that has one. The lease is what keeps a claim; SKIP LOCKED keeps two claims running
        # at once from taking the same row (the due test is checked again on the row locked).
        query = (
            select(DeliveryRow, WebhookRow)
            .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
            .join(turns, turns.c.id == DeliveryRow.id)
            .where(*due)
            .order_by(turns.c.turn, DeliveryRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=DeliveryRow)
        )
        with self._tx() as s:
            claimed = []
            for row, hook in s.execute(query):
                row.attempts += 1
                row.next_attempt_at = now + lease
                claimed.append(
                    Delivery(
                        id=row.id,
                        webhook_id=hook.id,
                        url=hook.url,
                        secret=hook.secret,
                        alert_id=row.alert_id,
                        revision=row.revision,
                        payload=dict(row.payload),
                        attempts=row.attempts,
                        kind=hook.kind,
                        previous_secret=hook.previous_secret,
                        previous_until=hook.previous_until,
                        created_at=row.created_at,
                        leased_until=row.next_attempt_at,
                    )
                )
            return claimed

    def release_delivery(
        self, delivery_id: int, leased_until: dt.datetime, due: dt.datetime
    ) -> bool:
        """Undoes a claim not sent: pending from `due`, the attempt not counted, the last
        error kept; only while the row is still under that claim (its lease end unchanged)."""
        with self._tx() as s:
            row = s.get(DeliveryRow, delivery_id, with_for_update=True)
            if row is None or row.state != PENDING or row.next_attempt_at != leased_until:
                return False
            row.attempts = max(row.attempts - 1, 0)
            row.next_attempt_at = due
            return True

    def finish_delivery(
        self,
        delivery_id: int,
        error: str,
        now: dt.datetime,
        retry_at: dt.datetime | None,
        leased_until: dt.datetime | None = None,
    ) -> None:
        """Delivered when `error` is empty; else retried at `retry_at`, or dead without one.
        A delivery no longer pending (finished by another claim) is left as it is; with the
        claim's `leased_until`, a failure counts only while that claim still holds the row
        (a sender whose lease lapsed must not fail, or kill, another replica's claim)."""
        with self._tx() as s:
            row = s.get(DeliveryRow, delivery_id, with_for_update=True)
            if row is None:
                return  # its webhook was removed meanwhile
            if row.state != PENDING:
                # A sender whose lease lapsed finishes after another replica did: a delivery
                # already delivered (or given up) keeps that outcome; a late failure must not
                # make a delivered one dead or give it an error it no longer has.
                return
            if error and leased_until is not None and row.next_attempt_at != leased_until:
                return  # claimed again elsewhere since: that claim's outcome decides
            if not error:
                row.state, row.delivered_at, row.last_error = DELIVERED, now, ""
            elif retry_at is None:
                row.state, row.last_error = DEAD, error[:500]
            else:
                row.next_attempt_at, row.last_error = retry_at, error[:500]


def _turns(
    due: tuple[ColumnElement[bool], ...],
    older_pending: ColumnElement[bool],
    per_webhook: int | None,
    busy: Mapping[str, int],
) -> Subquery:
    """The due deliveries a claim may take (id) and their device's turn: the device's
    first waiting delivery to a webhook has turn 1, its second turn 2, ... A claim takes
    turn 1 of every device before turn 2 of any, so a device with thousands queued delays
    no other device's alerts by more than one delivery of its own per device.

    With `per_webhook`, of each webhook only the first `per_webhook` in that order less the
    `busy` ones the claimer holds of it (webhooks with no room left are not even ranked)."""
    room = {hook: (per_webhook or 0) - n for hook, n in busy.items()}
    full = sorted(hook for hook, left in room.items() if left <= 0) if per_webhook else []
    device = func.coalesce(AlertRow.device_id, DeliveryRow.alert_id)  # its alert deleted
    turn = func.row_number().over(
        partition_by=(DeliveryRow.webhook_id, device), order_by=DeliveryRow.id
    )
    waiting = (
        select(DeliveryRow.id, DeliveryRow.webhook_id, turn.label("turn"))
        .outerjoin(AlertRow, AlertRow.id == DeliveryRow.alert_id)
        .where(*due, ~older_pending, DeliveryRow.webhook_id.not_in(full))
        .subquery()
    )
    if per_webhook is None:
        return select(waiting.c.id, waiting.c.turn).subquery()
    partly = {hook: left for hook, left in room.items() if left > 0}
    cap: ColumnElement[int] = literal(per_webhook)
    if partly:
        cap = case(partly, value=waiting.c.webhook_id, else_=per_webhook)
    rank = func.row_number().over(
        partition_by=waiting.c.webhook_id, order_by=(waiting.c.turn, waiting.c.id)
    )
    ranked = select(waiting.c.id, waiting.c.turn, rank.label("rank"), cap.label("cap")).subquery()
    return select(ranked.c.id, ranked.c.turn).where(ranked.c.rank <= ranked.c.cap).subquery()


def _webhook(
    row: WebhookRow, counts: dict[tuple[str, str], int], last_error: str = ""
) -> WebhookRecord:
    return WebhookRecord(
        id=row.id,
        url=row.url,
        secret=row.secret,
        filter=row.filter,
        created_at=row.created_at,
        delivered=counts.get((row.id, DELIVERED), 0),
        pending=counts.get((row.id, PENDING), 0),
        dead=counts.get((row.id, DEAD), 0),
        last_error=last_error,
        kind=row.kind,
        previous_secret=row.previous_secret,
        previous_until=row.previous_until,
    )
