"""The webhook sender against real HTTP receivers on loopback that misbehave: one that
trickles its answer, one that never answers, one that answers with a huge body. The other
webhooks' deliveries still arrive promptly, what is read of an answer is bounded, and no
delivery is lost or sent while another replica could claim it.

The store is an in-memory outbox with the store's claim contract (due, oldest first, a share
per webhook, leased, the attempt counted; a release undoes a claim): these tests are about the
sender's time and memory, and a database would only make them slower. The one about attempts
runs on the real stores."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloud.domain import AlertEventRecord, Lease
from cloud.store import Store, open_store
from cloud.store.sql import SqlStore
from cloud.store.tables import DeliveryRow
from cloud.webhook_kinds import new_secret
from cloud.webhook_records import Delivery
from cloud.webhooks import (
    ANSWER_BYTES,
    PER_WEBHOOK_CLAIMED,
    PER_WEBHOOK_SENDING,
    SenderSettings,
    WebhookSender,
)

pytestmark = pytest.mark.integration
SECRET = new_secret()
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclasses.dataclass
class Row:
    delivery: Delivery
    due: dt.datetime
    state: str = "pending"
    error: str = ""


@dataclasses.dataclass
class Finish:
    id: int
    error: str
    retry_at: dt.datetime | None
    at: float  # monotonic


class Outbox:
    """The store's delivery outbox, in memory: what the sender claims and what it records."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.finished: list[Finish] = []
        self.leases: list[dt.timedelta] = []
        self.released: list[tuple[int, dt.datetime]] = []
        self._lock = threading.Lock()

    def add(self, webhook: str, url: str, n: int = 1, after_s: float = 0.0) -> list[int]:
        with self._lock:
            ids = []
            for _ in range(n):
                i = len(self.rows) + 1
                payload = {"event": "alert.firing", "alert": {"id": f"a{i}", "peak_score": 2.0},
                           "device_labels": {}}  # fmt: skip
                d = Delivery(
                    id=i, webhook_id=webhook, url=url, secret=SECRET, alert_id=f"a{i}",
                    revision=1, payload=payload, attempts=0,
                    created_at=dt.datetime.now(dt.UTC),
                )  # fmt: skip
                due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=after_s)
                self.rows[i] = Row(d, due)
                ids.append(i)
            return ids

    def claim_deliveries(
        self,
        now: dt.datetime,
        lease: dt.timedelta,
        limit: int,
        per_webhook: int | None = None,
        busy: dict[str, int] | None = None,
    ) -> list[Delivery]:
        with self._lock:
            self.leases.append(lease)
            taken = dict(busy or {})
            claimed = []
            for row in sorted(self.rows.values(), key=lambda r: r.delivery.id):
                if len(claimed) == limit:
                    break
                hook = row.delivery.webhook_id
                if per_webhook is not None and taken.get(hook, 0) >= per_webhook:
                    continue
                if row.state == "pending" and row.due <= now:
                    attempts = row.delivery.attempts + 1
                    row.due = now + lease
                    row.delivery = dataclasses.replace(
                        row.delivery, attempts=attempts, leased_until=row.due
                    )
                    taken[hook] = taken.get(hook, 0) + 1
                    claimed.append(row.delivery)
            return claimed

    def release_delivery(
        self, delivery_id: int, leased_until: dt.datetime, due: dt.datetime
    ) -> bool:
        with self._lock:
            row = self.rows[delivery_id]
            if row.state != "pending" or row.due != leased_until:
                return False
            self.released.append((delivery_id, due))
            attempts = row.delivery.attempts - 1
            row.delivery = dataclasses.replace(row.delivery, attempts=attempts)
            row.due = due
            return True

    def finish_delivery(
        self,
        delivery_id: int,
        error: str,
        now: dt.datetime,
        retry_at: dt.datetime | None,
        leased_until: dt.datetime | None = None,
    ) -> None:
        with self._lock:
            self.finished.append(Finish(delivery_id, error, retry_at, time.monotonic()))
            row = self.rows[delivery_id]
            row.error = error
            if not error:
                row.state = "delivered"
            elif retry_at is None:
                row.state = "dead"
            else:
                row.due = retry_at

    def release_suppressed(self, now: dt.datetime) -> list[Any]:
        return []

    def try_lease(
        self, name: str, holder: str, now: dt.datetime | None, duration: dt.timedelta
    ) -> Lease:
        at = now or dt.datetime.now(dt.UTC)
        return Lease(name, holder, at + duration, at)  # one sender: always its own

    def rearm_deliveries(self, *args: Any) -> list[Any]:
        return []

    def prune_deliveries(self, *args: Any) -> int:
        return 0

    def finishes(self, delivery_id: int) -> list[Finish]:
        with self._lock:
            return [f for f in self.finished if f.id == delivery_id]

    def state(self, delivery_id: int) -> str:
        with self._lock:
            return self.rows[delivery_id].state


class Receivers:
    """HTTP receivers on loopback ports, each an asyncio server with its own behaviour."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []

    async def start(self, handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def _answer(writer: asyncio.StreamWriter, head: bytes) -> None:
    writer.write(head)
    await writer.drain()
    writer.close()


def _noting_arrivals(arrived: list[float], head: bytes) -> Handler:
    """A receiver that notes when (monotonic) each delivery arrived and answers with `head`."""

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.append(time.monotonic())
        await _answer(writer, head)

    return receive


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[tuple[dict[str, str], bytes]]:
    """Each request on a keep-alive connection (one connection serves several deliveries):
    its header fields, names lowercased, and its body; until the sender hangs up."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        fields = dict(
            line.decode().lower().split(":", 1) for line in head.split(b"\r\n")[1:] if line
        )
        yield fields, await reader.readexactly(int(fields["content-length"]))


async def _eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Waits (on the loop) until `check()`; returns how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _with_sender(
    outbox: Outbox, settings: SenderSettings, body: Callable[[], Awaitable[None]]
) -> None:
    """Runs the sender while `body` runs; then cancels it, as the control plane's stop does."""
    sender = WebhookSender(outbox, settings)  # type: ignore[arg-type]
    task = asyncio.create_task(sender.run(asyncio.Event()))
    try:
        await body()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_receiver_that_trickles_its_answer_holds_up_no_other_webhook() -> None:
    """A byte every 0.3 s keeps each of httpx's reads inside its timeout: before, the whole
    round waited for that receiver (30 s here) and the other webhook's delivery with it."""
    got_fast: list[float] = []

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with_status = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        for byte in range(len(with_status) + 100):  # never even a status line in 1 s
            writer.write(bytes([(with_status + b"x" * 100)[byte]]))
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.3)

    fast = _noting_arrivals(got_fast, b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        receivers = Receivers()
        outbox = Outbox()
        (slow_id,) = outbox.add("slow", await receivers.start(trickle))
        (fast_id,) = outbox.add("fast", await receivers.start(fast), after_s=0.5)
        due_at = time.monotonic() + 0.5
        settings = SenderSettings(timeout_s=1.0, poll_s=0.05)

        async def body() -> None:
            took = await _eventually(lambda: bool(got_fast), 20, "the other webhook's delivery")
            late = got_fast[0] - due_at
            assert late < 5, f"delivered {late:.1f} s after it was due (trickle: 30+ s)"
            await _eventually(lambda: outbox.finishes(slow_id) != [], 20, "the trickle's end")
            first = outbox.finishes(slow_id)[0]
            assert first.error.startswith("no answer from http://127.0.0.1:"), first
            assert first.error.endswith("in 1 s") and first.retry_at is not None, first
            assert outbox.state(fast_id) == "delivered", took

        try:
            await _with_sender(outbox, settings, body)
        finally:
            receivers.close()
        # No other replica can claim a delivery while one is on it: its lease lasts well past
        # the exchange's deadline.
        assert min(outbox.leases) >= dt.timedelta(seconds=3 * settings.timeout_s + 10)

    asyncio.run(main())


def test_a_receiver_that_never_answers_takes_only_its_share_of_the_slots() -> None:
    """40 deliveries to a receiver that never answers, claimed first (the oldest), and one to
    a healthy receiver: it arrives at once, not after the dead one's deadlines."""
    open_now, most_open, got = [0], [0], []
    hung = asyncio.Event()

    async def dead(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        open_now[0] += 1
        most_open[0] = max(most_open[0], open_now[0])
        try:
            await hung.wait()
        finally:
            open_now[0] -= 1
            writer.close()

    healthy = _noting_arrivals(got, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        receivers = Receivers()
        outbox = Outbox()
        dead_ids = outbox.add("dead", await receivers.start(dead), n=40)
        (healthy_id,) = outbox.add("healthy", await receivers.start(healthy))
        started = time.monotonic()
        # A deadline the test never reaches: before, the round waited 30 s for all of them.
        settings = SenderSettings(timeout_s=30.0, poll_s=0.05, retry_initial_s=60.0)

        async def body() -> None:
            await _eventually(lambda: bool(got), 15, "the healthy webhook's delivery")
            assert got[0] - started < 10, f"arrived after {got[0] - started:.1f} s"
            await _eventually(lambda: open_now[0] == PER_WEBHOOK_SENDING, 10, "dead in flight")
            # The receiver notes the arrival before it answers: the sender records it after.
            await _eventually(
                lambda: outbox.state(healthy_id) == "delivered", 15, "the healthy one recorded"
            )

        try:
            await _with_sender(outbox, settings, body)
        finally:
            hung.set()
            receivers.close()
        assert most_open[0] == PER_WEBHOOK_SENDING, most_open
        # Those past its share were never claimed (no attempt counted); at stop, those waiting
        # for a slot were released, due again at once, their attempts not counted either.
        assert not [f for i in dead_ids for f in outbox.finishes(i)], outbox.finished
        attempts = [outbox.rows[i].delivery.attempts for i in dead_ids]
        assert attempts.count(1) == PER_WEBHOOK_SENDING, attempts  # in flight: their leases
        assert attempts.count(0) == 40 - PER_WEBHOOK_SENDING, attempts  # lapse, then resent
        assert len(outbox.released) == PER_WEBHOOK_CLAIMED - PER_WEBHOOK_SENDING, outbox.released
        assert all(outbox.state(i) == "pending" for i in dead_ids)

    asyncio.run(main())


def test_a_burst_to_one_webhook_is_delivered_whole() -> None:
    """More deliveries to one webhook than its share of the slots: those given back are sent
    later, none lost, none dead."""
    seen: list[bytes] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _, body in _requests(reader):
            seen.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    async def main() -> None:
        receivers = Receivers()
        outbox = Outbox()
        ids = outbox.add("one", await receivers.start(receiver), n=100)
        settings = SenderSettings(timeout_s=5.0, poll_s=0.05, retry_initial_s=0.05,
                                  retry_max_s=0.2)  # fmt: skip

        async def body() -> None:
            def all_delivered() -> bool:
                return all(outbox.state(i) == "delivered" for i in ids)

            await _eventually(all_delivered, 60, "every delivery of the burst")

        try:
            await _with_sender(outbox, settings, body)
        finally:
            receivers.close()
        assert len(seen) >= len(ids), len(seen)

    asyncio.run(main())


def test_of_a_huge_answer_only_its_first_bytes_are_read() -> None:
    """A receiver answering 500 with a 300 MiB body: the sender read (and decoded) all of it
    to keep 200 characters, 904 MiB of memory. Now it reads ANSWER_BYTES and hangs up."""
    size = 300 * 2**20
    sent = [0]
    done = asyncio.Event()

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"\x1b[2Je" + b"e" * (2**20 - 5)  # a terminal escape first: not kept as is
        try:
            while sent[0] < size:
                writer.write(chunk)
                await writer.drain()
                sent[0] += len(chunk)
        except ConnectionError:
            pass
        finally:
            done.set()
            writer.close()

    async def main() -> None:
        receivers = Receivers()
        outbox = Outbox()
        (i,) = outbox.add("huge", await receivers.start(huge))
        settings = SenderSettings(timeout_s=30.0, poll_s=0.05, retry_initial_s=60.0)

        async def body() -> None:
            await _eventually(lambda: outbox.finishes(i) != [], 25, "the delivery's outcome")
            await asyncio.wait_for(done.wait(), 25)

        try:
            await _with_sender(outbox, settings, body)
        finally:
            receivers.close()
        # What the receiver got out before the sender hung up: socket buffers, no more.
        assert sent[0] < 64 * 2**20, f"{sent[0] / 2**20:.0f} MiB of the body were sent"
        (finish,) = outbox.finishes(i)
        # Its first 200 characters, with what a terminal or a log reader would act on blanked.
        assert finish.error == "HTTP 500: [2J" + "e" * 196, finish.error
        assert ANSWER_BYTES <= 4096

    asyncio.run(main())


def test_a_delivery_that_waited_too_long_for_a_slot_is_released_at_no_cost() -> None:
    """One claimed so long ago that its lease could lapse mid-exchange is not sent: it is
    released, its attempt not counted and the receiver's last error kept (before: the attempt
    counted and its error became "not sent: it waited ..."). One whose claim is already
    over (claimed again meanwhile) is left to its new holder."""
    outbox = Outbox()
    first, other = outbox.add("slow", "http://127.0.0.1:9/hook", n=2)
    for i in (first, other):  # a failed attempt each, the receiver's error recorded
        outbox.rows[i].error = "HTTP 503: down"
        outbox.rows[i].delivery = dataclasses.replace(outbox.rows[i].delivery, attempts=1)
    now = dt.datetime.now(dt.UTC)
    settings = SenderSettings(timeout_s=5.0)
    sender = WebhookSender(outbox, settings)  # type: ignore[arg-type]
    claimed = outbox.claim_deliveries(now, dt.timedelta(seconds=50), 10)
    assert [d.attempts for d in claimed] == [2, 2]
    outbox.rows[other].due = now + dt.timedelta(hours=1)  # lapsed and claimed by another
    long_ago = time.monotonic() - 3600

    async def deliver() -> None:
        for d in claimed:
            sender._claimed, sender._sending = 1, {d.webhook_id: 1}
            await sender._deliver(d, long_ago)

    asyncio.run(deliver())
    assert outbox.finished == []  # nothing sent, nothing recorded as an attempt's outcome
    ((released, due),) = outbox.released
    assert released == first and due >= now + dt.timedelta(seconds=settings.timeout_s), due
    assert outbox.rows[first].delivery.attempts == 1
    assert outbox.rows[first].error == "HTTP 503: down"
    assert outbox.rows[other].delivery.attempts == 2  # its new holder's claim


@pytest.fixture(params=["sqlite", "postgresql"])
def real_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        f"sqlite:///{tmp_path / 'autoglm.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    store = open_store(url)
    yield store
    store.close()


def _backlog(store: Store, url: str, n: int) -> None:
    """`n` alerts raised on one device, each queued to the one webhook at `url`."""
    now = dt.datetime.now(dt.UTC)
    device = store.create_device("pump-station", {}, "", now).id
    store.add_webhook(url, SECRET, "", now)
    events = [
        AlertEventRecord(
            device_id=device,
            sequence=i,
            alert_key=f"pump-{i}:anomaly:{i}",
            kind="raised",
            asset=f"pump-{i}",
            fault="anomaly",
            score=2.0,
            top_sensors=[("flow", 0.7)],
            window_start=now,
            window_end=now,
            raised_at=now,
            model_version="1",
        )
        for i in range(1, n + 1)
    ]
    store.store_records(device, [], events, now)


def test_a_dead_receivers_backlog_is_tried_max_attempts_times_each(real_store: Store) -> None:
    """100 deliveries queued to a receiver that answers 503: each goes dead only after it was
    sent max_attempts times, with the receiver's answer as its last error. Before, the sender
    claimed more of them than the webhook's share and gave the extra back; each claim counted
    an attempt, so deliveries went dead after fewer sends, and a give-back's "not sent: ..."
    replaced the receiver's error."""
    backlog, max_attempts = 100, 3
    sends: dict[str, int] = {}

    async def down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for fields, _ in _requests(reader):
            delivery = fields["webhook-id"].strip()
            sends[delivery] = sends.get(delivery, 0) + 1
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\ndown")
            await writer.drain()
        writer.close()

    async def main() -> None:
        receivers = Receivers()
        _backlog(real_store, await receivers.start(down), backlog)
        settings = SenderSettings(timeout_s=5.0, poll_s=0.05, retry_initial_s=0.05,
                                  retry_max_s=0.2, max_attempts=max_attempts)  # fmt: skip
        sender = WebhookSender(real_store, settings)
        task = asyncio.create_task(sender.run(asyncio.Event()))

        def all_dead() -> bool:
            return real_store.list_webhooks()[0].dead == backlog

        try:
            await _eventually(all_dead, 120, "every delivery dead")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            receivers.close()

    asyncio.run(main())
    assert isinstance(real_store, SqlStore)
    with real_store.engine.connect() as c:
        rows = c.execute(select(DeliveryRow.id, DeliveryRow.attempts, DeliveryRow.last_error)).all()
    assert len(rows) == backlog
    # Recorded attempts are real sends (at least once: never fewer sends than attempts).
    wrong = {i: (attempts, sends.get(f"dlv_{i}", 0)) for i, attempts, _ in rows
             if attempts != sends.get(f"dlv_{i}", 0) or attempts != max_attempts}  # fmt: skip
    assert not wrong, f"(attempts recorded, times sent) of {len(wrong)}: {wrong}"
    errors = {error for _, _, error in rows}
    assert errors == {"HTTP 503: down"}, errors
    assert real_store.list_webhooks()[0].last_error == "HTTP 503: down"
