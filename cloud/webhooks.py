"""Webhook deliveries: signed JSON POSTs with retries, from the store's delivery outbox.

Each request carries
    Content-Type: application/json
    X-Autoglm-Event: alert.firing | alert.acknowledged | alert.resolved
    X-Autoglm-Delivery: <id>       (the same on every retry: receivers drop repeats by it)
    X-Autoglm-Timestamp: <unix seconds>
    X-Autoglm-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
A 2xx answer delivers it; anything else (or no answer in `timeout_s`) is retried with
exponential backoff until `max_attempts`, then the delivery is dead (`webhook list` shows
the count and the last error).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloud.clock import Clock, utc_now
from cloud.domain import Delivery
from cloud.store import Store
from edge_agent.errors import IntegrityError, InvalidInput

log = logging.getLogger(__name__)
BATCH = 32


def check_url(url: str) -> str:
    """The URL if a webhook can POST to it; InvalidInput says what is wrong otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"webhook URL {redacted(url)!r}: the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            f"webhook URL {redacted(url)!r} carries credentials (user:password@): they would be "
            "stored and logged in clear; the receiver checks X-Autoglm-Signature instead"
        )
    if not parts.hostname:
        raise InvalidInput(f"webhook URL {redacted(url)!r} has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidInput(f"webhook URL {redacted(url)!r} has a bad port") from None
    return url.strip()


def redacted(url: str) -> str:
    """What logs and errors show of a webhook URL: scheme, host and port. Paths and queries
    often hold the receiver's own token (chat and incident-tool hooks)."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or "?"
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


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclasses.dataclass(frozen=True)
class SenderSettings:
    max_attempts: int = 8
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    timeout_s: float = 10.0
    poll_s: float = 1.0


class WebhookSender:
    def __init__(
        self,
        store: Store,
        settings: SenderSettings,
        clock: Clock = utc_now,
        box: SecretBox | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.box = box
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Alerts changed in this process: look for deliveries now (call on the loop)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                sent = await self.send_due()
            except Exception:
                log.exception("webhook round failed")
                sent = 0
            if sent == BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def send_due(self) -> int:
        """Claims and sends due deliveries, concurrently; how many were attempted."""
        lease = dt.timedelta(seconds=self.settings.timeout_s * 3)
        due = await asyncio.to_thread(self.store.claim_deliveries, self.clock(), lease, BATCH)
        await asyncio.gather(*(self._send(d) for d in due))
        return len(due)

    async def _send(self, d: Delivery) -> None:
        error = await asyncio.to_thread(self._post, d)
        now = self.clock()
        retry_at = None
        if error and d.attempts < self.settings.max_attempts:
            delay = min(
                self.settings.retry_initial_s * 2 ** (d.attempts - 1), self.settings.retry_max_s
            )
            retry_at = now + dt.timedelta(seconds=delay)
        if error:
            what = f"retry at {retry_at:%H:%M:%S}" if retry_at else "giving up (dead)"
            log.warning(
                "webhook delivery %d to %s failed (attempt %d/%d: %s); %s",
                d.id, redacted(d.url), d.attempts, self.settings.max_attempts, error, what,
            )  # fmt: skip
        await asyncio.to_thread(self.store.finish_delivery, d.id, error, now, retry_at)

    def _post(self, d: Delivery) -> str:
        """POSTs one delivery; "" on a 2xx, else what went wrong."""
        body = json.dumps({"delivery_id": d.id, **d.payload}, sort_keys=True).encode()
        stamp = int(time.time())
        try:
            secret = self.box.open(d.secret) if self.box is not None else d.secret
        except IntegrityError as exc:
            return str(exc)
        request = urllib.request.Request(
            d.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "autoglm-edge-cloud",
                "X-Autoglm-Event": str(d.payload.get("event", "")),
                "X-Autoglm-Delivery": str(d.id),
                "X-Autoglm-Timestamp": str(stamp),
                "X-Autoglm-Signature": sign(secret, stamp, body),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"cannot reach {redacted(d.url)}: {reason}"
        return "" if 200 <= status < 300 else f"HTTP {status}"
