"""Alert deliveries from the store's delivery outbox: Standard Webhooks, PagerDuty and
Alertmanager targets (their formats: `cloud.alert_targets`), over one HTTP client that keeps
connections.

A 2xx answer delivers a change; no answer in `timeout_s`, a 5xx, 408 or 429 is retried with
the project's jittered exponential backoff until `max_attempts`; any other 4xx (the receiver
refuses it) and the last failed attempt make the delivery dead (`webhook list` shows the
count and the last error).
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
from collections.abc import Callable

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

log = logging.getLogger(__name__)
BATCH = 32
PRUNE_EVERY_S = 3600.0


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
        self._pruned = -math.inf
        # Told each attempt's kind, outcome (delivered, retry, dead) and, when delivered, the
        # seconds since it was queued (the control plane's metrics).
        self.on_result: Callable[[str, str, float | None], None] | None = None

    def wake(self, sweep: bool = False) -> None:
        """Alerts changed in this process: look for deliveries now (call on the loop); with
        `sweep`, for alerts released from maintenance or shelving too."""
        if sweep:
            self._swept = -math.inf
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        # One client: connections to each receiver are kept and reused.
        limits = httpx.Limits(max_connections=BATCH, max_keepalive_connections=BATCH)
        async with httpx.AsyncClient(
            timeout=self.settings.timeout_s, limits=limits, follow_redirects=False
        ) as http:
            self._http = http
            outage = OutageLog(log, "webhook delivery")
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.sweep()
                    sent = await self.send_due()
                except Unavailable as exc:  # the database away: a line now and then
                    outage.failed(exc, self.settings.poll_s)
                    sent = 0
                except Exception:
                    log.exception("webhook round failed")
                    sent = 0
                else:
                    outage.worked()
                if sent == BATCH:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        self._http = None

    async def sweep(self, force: bool = False) -> None:
        """Every `sweep_s`: delivers alerts whose shelving or maintenance window ended, and
        repeats open alerts to Alertmanager targets before their endsAt passes."""
        if not force and time.monotonic() - self._swept < self.settings.sweep_s:
            return
        self._swept = time.monotonic()
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

    async def send_due(self) -> int:
        """Claims and sends due deliveries, concurrently; how many were attempted."""
        lease = dt.timedelta(seconds=self.settings.timeout_s * 3)
        due = await asyncio.to_thread(self.store.claim_deliveries, self.clock(), lease, BATCH)
        await asyncio.gather(*(self._send(d) for d in due))
        return len(due)

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
        await asyncio.to_thread(self.store.finish_delivery, d.id, error, now, retry_at)

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
        http = self._http
        if http is None:
            async with httpx.AsyncClient(timeout=self.settings.timeout_s) as once:
                return await _exchange(once, request, d)
        return await _exchange(http, request, d)


async def _exchange(http: httpx.AsyncClient, request: Request, d: Delivery) -> tuple[str, bool]:
    headers = {"user-agent": "autoglm-edge-cloud", **request.headers}
    try:
        response = await http.post(request.url, content=request.body, headers=headers)
    except httpx.HTTPError as exc:
        return f"cannot reach {redacted(d.url)}: {exc!r}", False
    status = response.status_code
    if 200 <= status < 300:
        return "", False
    detail = response.text[:200].strip()
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    return error, 400 <= status < 500 and status not in (408, 429)
