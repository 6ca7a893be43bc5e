"""Alert deliveries from the store's delivery outbox: Standard Webhooks, PagerDuty and
Alertmanager targets (their formats: `cloud.alert_targets`), over one HTTP client that keeps
connections.

A 2xx answer delivers a change; no answer in `timeout_s` (one deadline for the whole
exchange, however slowly the receiver trickles), a 5xx, 408 or 429 is retried with the
project's jittered exponential backoff until `max_attempts`; any other 4xx (the receiver
refuses it) and the last failed attempt make the delivery dead (`webhook list` shows the
count and the last error). Of an answer, at most ANSWER_BYTES are read.

Deliveries are claimed into SLOTS as slots free, not in batches waited for as a whole, and a
webhook takes at most PER_WEBHOOK_CLAIMED of them (PER_WEBHOOK_SENDING in flight, the rest
waiting for those): one slow or dead receiver holds up neither the others' deliveries nor
more than its share. The store's claim leaves a webhook's deliveries past its share unclaimed
(a claim counts an attempt: claiming them only to give them back made a backlog go dead
before it was tried `max_attempts` times). A claim is leased (`lease_s`) well past the time
its delivery can take, so no other replica claims it while in flight; one this replica cannot
send in time is released, due again later with neither its attempt counted nor its last error
replaced (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import cast

import httpx
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloud.alert_targets import Request, build
from cloud.clock import Clock, utc_now
from cloud.outage_log import OutageLog
from cloud.severity import SeverityRule
from cloud.store import Store
from cloud.webhook_records import Delivery
from edge_agent.errors import IntegrityError, InvalidInput, Unavailable
from edge_agent.retry import Backoff
from edge_agent.waits import event_or_timeout

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0
SLOTS = 32  # deliveries one replica holds claimed at once: in flight or waiting for a slot
PER_WEBHOOK_SENDING = 8  # in flight to one webhook at once
PER_WEBHOOK_CLAIMED = 24  # claimed for one webhook (in flight or waiting): 8 stay for others
ANSWER_BYTES = 1024  # read of a receiver's answer (its first 200 characters are kept)
LEASE_MARGIN_S = 30.0  # of a claim's lease, beyond the longest its delivery can take
SWEEP_LEASE = "webhook-sweep"  # the store lease of the replica that sweeps for the fleet


def check_url(url: str) -> str:
    """The URL if a webhook can POST to it; InvalidInput says what is wrong otherwise."""
    url = url.strip()
    for i, char in enumerate(url):
        if char.isspace() or not char.isprintable():  # CR/LF, NUL, spaces: httpx refuses them
            raise InvalidInput(
                f"webhook URL: character {char!r} at position {i} cannot be in a URL "
                "(control and white-space characters: percent-encode them, e.g. %20)"
            )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "http://[::1/x": an IPv6 host without its "]"
        raise InvalidInput(f"webhook URL is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"webhook URL {redacted(url)!r}: the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            f"webhook URL {redacted(url)!r} carries credentials (user:password@): they would be "
            "stored and logged in clear; receivers check the webhook-signature header instead"
        )
    if not parts.hostname:
        raise InvalidInput(f"webhook URL {redacted(url)!r} has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidInput(f"webhook URL {redacted(url)!r} has a bad port") from None
    try:  # what will send it: a URL it refuses would make every delivery dead
        httpx.URL(url)
    except httpx.InvalidURL as exc:  # its messages name the host or port, never the path
        raise InvalidInput(f"webhook URL {redacted(url)!r} cannot be sent to: {exc}") from None
    return url


def redacted(url: str) -> str:
    """What logs and errors show of a webhook URL: scheme, host and port. Paths and queries
    often hold the receiver's own token (chat and incident-tool hooks)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:
        return "(not a URL)"
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    rest = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


class SecretBox:
    """Webhook secrets encrypted at rest (Fernet: AES-128-CBC and HMAC-SHA256) with a key
    derived from the control plane's CA key, which every replica holds already (the state dir,
    or its Kubernetes Secret): a copy of the database alone does not reveal them. Secrets
    stored before encryption (no prefix) are read as they are."""

    PREFIX = "enc1:"

    def __init__(self, key_material: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"autoglm webhook secrets v1"
        ).derive(key_material)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, secret: str) -> str:
        return self.PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(self.PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(self.PREFIX) :].encode()).decode()
        except InvalidToken:
            raise IntegrityError(
                "a webhook secret does not decrypt with this control plane's key (was the CA "
                "key replaced?); remove the webhook and add it again"
            ) from None


@dataclasses.dataclass(frozen=True)
class SenderSettings:
    max_attempts: int = 8
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    timeout_s: float = 10.0
    poll_s: float = 1.0
    alertmanager_hold_s: float = 900.0
    severity_rules: tuple[SeverityRule, ...] = ()
    sweep_s: float = 5.0  # shelvings and windows that ended; Alertmanager repeats
    delivery_retention_days: float = 30.0  # delivered changes of closed alerts, then pruned


def lease_s(deadline_s: float) -> float:
    """How long a claim keeps a delivery this replica's. Its wait for a slot of its webhook
    takes at most two deadlines (PER_WEBHOOK_CLAIMED / PER_WEBHOOK_SENDING - 1 rounds of
    exchanges), its exchange one; a delivery not started within three is released."""
    return 4 * deadline_s + LEASE_MARGIN_S


class WebhookSender:
    def __init__(
        self,
        store: Store,
        settings: SenderSettings,
        clock: Clock = utc_now,
        box: SecretBox | None = None,
        wall_clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        # Signatures and Alertmanager's endsAt follow the receivers' clocks, never a test's.
        self.wall_clock = wall_clock
        self.box = box
        self.backoff = Backoff(settings.retry_initial_s, max(settings.retry_max_s,
                                                             settings.retry_initial_s))  # fmt: skip
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._swept = -math.inf
        self._sweep_now = False  # the next sweep at once, lease or not (`wake`)
        self._pruned = -math.inf
        self._holder = f"webhooks-{uuid.uuid4()}"  # this sender, as the sweep lease names it
        # The pool: per webhook, deliveries in flight and those claimed waiting for a slot.
        self._sending: dict[str, int] = {}
        self._waiting: dict[str, deque[tuple[Delivery, float]]] = {}
        self._claimed = 0  # in flight and waiting, all webhooks
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Told each attempt's kind, outcome (delivered, retry, dead; deferred: claimed, not
        # sent, released to be tried later) and, when delivered, the seconds since it was
        # queued.
        self.on_result: Callable[[str, str, float | None], None] | None = None

    def wake(self, sweep: bool = False) -> None:
        """Alerts changed in this process: look for deliveries now (call on the loop); with
        `sweep`, for alerts released from maintenance or shelving too (here, at once,
        whichever replica holds the sweep lease)."""
        if sweep:
            self._sweep_now = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        # One client: connections to each receiver are kept and reused.
        limits = httpx.Limits(max_connections=SLOTS, max_keepalive_connections=SLOTS)
        async with httpx.AsyncClient(
            timeout=self.settings.timeout_s, limits=limits, follow_redirects=False
        ) as http:
            self._http = http
            self._closing = False
            outage = OutageLog(log, "webhook delivery")
            try:
                while not stop.is_set():
                    self._wake.clear()
                    try:
                        await self.sweep()
                        more = await self.send_due()
                    except Unavailable as exc:  # the database away: a line now and then
                        outage.failed(exc, self.settings.poll_s)
                        more = False
                    except Exception:
                        log.exception("webhook round failed")
                        more = False
                    else:
                        outage.worked()
                    if more:
                        continue
                    # A delivery that ends frees a slot and wakes this loop.
                    await event_or_timeout(self._wake, self.settings.poll_s)
                self._closing = True  # asked to stop: what is in flight ends in its deadline
                await asyncio.gather(*self._tasks, return_exceptions=True)
            finally:
                await self._close()
                self._http = None

    async def sweep(self, force: bool = False) -> None:
        """Every `sweep_s`: delivers alerts whose shelving or maintenance window ended, and
        repeats open alerts to Alertmanager targets before their endsAt passes.

        Once per interval for the whole fleet, not once per replica: the replica holding the
        SWEEP_LEASE sweeps (renewing it), the others only take it over when it lapses (its
        holder stopped). A `force`d sweep, or the next after `wake(sweep=True)` (windows
        changed through this replica), runs here at once whoever holds it."""
        force, self._sweep_now = force or self._sweep_now, False
        if not force and time.monotonic() - self._swept < self.settings.sweep_s:
            return
        self._swept = time.monotonic()
        if not force and not await asyncio.to_thread(self._holds_sweep):
            return
        now = self.clock()
        released = await asyncio.to_thread(self.store.release_suppressed, now)
        repeat = dt.timedelta(seconds=self.settings.alertmanager_hold_s / 3)
        rearmed = await asyncio.to_thread(
            self.store.rearm_deliveries, "alertmanager", now - repeat, now
        )
        if time.monotonic() - self._pruned >= PRUNE_EVERY_S:
            self._pruned = time.monotonic()
            keep = dt.timedelta(days=self.settings.delivery_retention_days)
            pruned = await asyncio.to_thread(self.store.prune_deliveries, now - keep)
            if pruned:
                log.info("%d delivered change(s) of closed alerts pruned", pruned)
        if released:
            log.info("%d alert(s) released from shelving or maintenance", len(released))
        if released or rearmed:
            self.wake()

    def _holds_sweep(self) -> bool:
        """Takes or renews the fleet's sweep lease; whether this sender holds it. It lasts
        two intervals: its holder renews it each, another replica takes it a missed one on."""
        duration = dt.timedelta(seconds=2 * self.settings.sweep_s)
        lease = self.store.try_lease(SWEEP_LEASE, self._holder, None, duration)
        return lease.holder == self._holder

    async def send_due(self) -> bool:
        """Claims due deliveries into the free slots, no webhook's past PER_WEBHOOK_CLAIMED
        (those it holds counted), and starts them, at most PER_WEBHOOK_SENDING per webhook at
        once (the rest of a webhook's wait for those). True when more may be due and a slot
        is free for them."""
        free = SLOTS - self._claimed
        if free <= 0 or self._closing:
            return False
        lease = dt.timedelta(seconds=lease_s(self.settings.timeout_s))
        busy = {
            hook: self._sending.get(hook, 0) + len(self._waiting.get(hook, ()))
            for hook in self._sending.keys() | self._waiting.keys()
        }
        claimed_at = time.monotonic()  # the lease runs from here, queued claim included
        due = await asyncio.to_thread(
            self.store.claim_deliveries,
            self.clock(),
            lease,
            free,
            per_webhook=PER_WEBHOOK_CLAIMED,
            busy=busy,
        )
        for d in due:
            self._waiting.setdefault(d.webhook_id, deque()).append((d, claimed_at))
            self._claimed += 1
            self._start_waiting(d.webhook_id)
        return len(due) == free and self._claimed < SLOTS

    def _start_waiting(self, webhook_id: str) -> None:
        """Starts the waiting deliveries of a webhook its free slots allow, oldest first."""
        waiting = self._waiting.get(webhook_id)
        while waiting and not self._closing:
            sending = self._sending.get(webhook_id, 0)
            if sending >= PER_WEBHOOK_SENDING:
                break
            d, claimed_at = waiting.popleft()
            self._sending[webhook_id] = sending + 1
            task = asyncio.create_task(self._deliver(d, claimed_at))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if waiting is not None and not waiting:
            del self._waiting[webhook_id]

    async def _deliver(self, d: Delivery, claimed_at: float) -> None:
        """One claimed delivery in its slot: sent, or released when it waited so long that
        its lease could lapse before its deadline (another replica may then claim it)."""
        deadline = self.settings.timeout_s
        try:
            waited = time.monotonic() - claimed_at
            if waited > lease_s(deadline) - deadline - LEASE_MARGIN_S:
                await self._release([d], f"it waited {waited:.0f} s for a slot")
            else:
                await self._send(d)
        except Unavailable as exc:  # its outcome not stored: the claim lapses, it is resent
            log.warning("webhook delivery %d: cannot store its outcome (%s)", d.id, exc)
        except Exception:
            log.exception("webhook delivery %d failed", d.id)
        finally:
            left = self._sending.pop(d.webhook_id, 1) - 1
            if left:
                self._sending[d.webhook_id] = left
            self._claimed -= 1
            self._start_waiting(d.webhook_id)
            self._wake.set()

    async def _release(
        self, deliveries: Iterable[Delivery], why: str, at_once: bool = False
    ) -> None:
        """Deliveries claimed but not sent: released to the store, their claims' attempts
        not counted and their last errors kept, due again in one deadline (a slot of their
        webhook is likely free by then) or, `at_once`, now (to any replica). One whose claim
        is over (its lease lapsed) is left as it is: whoever holds it now sends it."""
        now = self.clock()
        due = now if at_once else now + dt.timedelta(seconds=self.settings.timeout_s)
        back = [(d, d.leased_until) for d in deliveries if d.leased_until is not None]

        def store() -> int:
            return sum(self.store.release_delivery(d.id, lease, due) for d, lease in back)

        released = await asyncio.to_thread(store)
        for d, _ in back:
            if self.on_result is not None:
                self.on_result(d.kind, "deferred", None)
        hooks = sorted({redacted(d.url) for d, _ in back})
        log.info("%d webhook delivery(ies) to %s not sent (%s); %d released to be tried again",
                 len(back), ", ".join(hooks), why, released)  # fmt: skip

    async def _close(self) -> None:
        """Leaving: deliveries in flight are cancelled (their claims lapse, then any replica
        sends them), those waiting are released at once."""
        self._closing = True
        waiting = [d for queue in self._waiting.values() for d, _ in queue]
        self._waiting.clear()
        self._claimed -= len(waiting)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if waiting:
            try:
                async with asyncio.timeout(LEASE_MARGIN_S / 3):
                    await self._release(waiting, "this control plane stopped", at_once=True)
            except Exception as exc:  # noqa: BLE001 - their claims lapse instead
                log.warning("%d waiting webhook deliveries not released (%s)", len(waiting), exc)

    async def _send(self, d: Delivery) -> None:
        try:
            error, permanent = await self._post(d)
        except Exception as exc:  # noqa: BLE001 - any other failure ends it, never blocks
            error, permanent = f"cannot send this delivery: {exc!r}"[:500], True
        now = self.clock()
        retry_at = None
        if error and not permanent and d.attempts < self.settings.max_attempts:
            retry_at = now + dt.timedelta(seconds=self.backoff.delay(d.attempts))
        if self.on_result is not None:
            outcome = "delivered" if not error else "retry" if retry_at else "dead"
            queued = d.created_at
            latency = (now - queued).total_seconds() if queued and not error else None
            self.on_result(d.kind, outcome, latency)
        if error:
            what = f"retry at {retry_at:%H:%M:%S}" if retry_at else "giving up (dead)"
            log.warning(
                "webhook delivery %d to %s failed (attempt %d/%d: %s); %s",
                d.id, redacted(d.url), d.attempts, self.settings.max_attempts, error, what,
            )  # fmt: skip
        await asyncio.to_thread(
            self.store.finish_delivery, d.id, error, now, retry_at, d.leased_until
        )

    def _secrets(self, d: Delivery, now: dt.datetime) -> list[str]:
        stored = [d.secret]
        if d.previous_secret and d.previous_until is not None and d.previous_until > now:
            stored.append(d.previous_secret)
        return [self.box.open(s) if self.box is not None else s for s in stored]

    async def _post(self, d: Delivery) -> tuple[str, bool]:
        """POSTs one delivery: ("", False) on a 2xx, else what went wrong and whether
        retrying cannot help (a 4xx other than 408 and 429: the receiver refuses it)."""
        now = self.wall_clock()
        try:
            request = build(
                d,
                self._secrets(d, self.clock()),
                now,
                self.settings.severity_rules,
                self.settings.alertmanager_hold_s,
            )
        except IntegrityError as exc:
            return str(exc), False
        except (KeyError, TypeError, ValueError) as exc:  # a payload this version cannot read
            return f"cannot build the {d.kind} request: {exc!r}", True
        deadline = self.settings.timeout_s
        http = self._http
        if http is None:
            async with httpx.AsyncClient(timeout=deadline) as once:
                return await _exchange(once, request, d, deadline)
        return await _exchange(http, request, d, deadline)


async def _exchange(
    http: httpx.AsyncClient, request: Request, d: Delivery, deadline_s: float
) -> tuple[str, bool]:
    """One POST and its answer within `deadline_s` in all (httpx's timeout is per read: a
    receiver sending a byte a second would never trip it), reading at most ANSWER_BYTES."""
    # Uncompressed answers: what is read of one is then at most what is kept of it.
    headers = {"user-agent": "autoglm-edge-cloud", "accept-encoding": "identity",
               **request.headers}  # fmt: skip
    status, head = 0, b""
    try:
        async with (
            asyncio.timeout(deadline_s),
            http.stream("POST", request.url, content=request.body, headers=headers) as response,
        ):
            status = response.status_code
            # Even a 2xx's: an answer read to its end leaves the connection open for the next.
            head = await _head(response, ANSWER_BYTES)
    except (TimeoutError, httpx.HTTPError) as exc:
        if status:
            pass  # the answer's status came: the rest of it is not needed
        elif isinstance(exc, TimeoutError):
            return f"no answer from {redacted(d.url)} in {deadline_s:g} s", False
        else:
            return f"cannot reach {redacted(d.url)}: {exc!r}", False
    if 200 <= status < 300:
        return "", False
    text = head.decode("utf-8", "replace")[:200]
    detail = "".join(c if c.isprintable() else " " for c in text).strip()
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    return error, 400 <= status < 500 and status not in (408, 429)


async def _head(response: httpx.Response, limit: int) -> bytes:
    """Up to `limit` bytes of an answer's body (as sent), the rest left unread."""
    head = b""
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # closed when left early
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            head += chunk[: limit - len(head)]
            if len(head) >= limit:
                break
    return head
