"""Webhook deliveries to a real local HTTP receiver that verifies them with the
`standardwebhooks` library: signed, once, in order, retried while the receiver is down,
across a control-plane restart and a secret rotation; bad URLs, filters and secrets are
clear errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from cloud.webhook_kinds import new_secret
from cloud.webhooks import SecretBox, check_url, redacted
from edge_agent.errors import IntegrityError, InvalidInput
from tests.support.agents import wait_for
from tests.support.alerting import T0, Site, cleared, open_site, raised

pytestmark = pytest.mark.integration
SECRET = new_secret()
FAST_RETRIES = {
    "webhook_retry_initial_s": 0.2,
    "webhook_retry_max_s": 0.5,
    "webhook_poll_s": 0.2,
    "webhook_max_attempts": 30,
}


class Receiver:
    """An HTTP endpoint on loopback that verifies deliveries as a Standard Webhooks
    consumer does (the library, with the secret it was given) and records what it accepted.
    `status` is what it answers; `stop()` closes the port, `start()` opens it again."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.signatures: list[str] = []
        self.bad_signatures = 0
        self.requests = 0
        self.status = 200
        self.port = 0
        self.secret = SECRET
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                try:
                    doc = Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                except WebhookVerificationError:
                    receiver.bad_signatures += 1
                    self.send_response(401)
                else:
                    if receiver.status == 200:
                        receiver.accepted.append(doc)
                        receiver.ids.append(self.headers["webhook-id"])
                        receiver.signatures.append(self.headers["webhook-signature"])
                    self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/autoglm"

    def events(self) -> list[tuple[str, str]]:
        return [(d["type"], d["data"]["asset"]) for d in self.accepted]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with open_site(tmp_path, **FAST_RETRIES) as s:
        yield s


def test_signed_deliveries_arrive_once_in_order_across_a_restart(
    site: Site, receiver: Receiver
) -> None:
    with site.plane.client() as client:
        hook = client.add_webhook(receiver.url, SECRET)
    site.outbox.append([raised("pump-1", T0)])
    wait_for(lambda: receiver.events() == [("alert.firing", "pump-1")], timeout=30)
    alert = receiver.accepted[0]["data"]
    assert alert["device_name"] == "edge-1" and alert["top_sensors"][0]["sensor"]
    assert alert["severity"] == "minor" and alert["device_labels"] == {"site": "a"}
    site.restart_plane()
    site.outbox.append([raised("pump-1", T0 + 20, score=2.4), cleared("pump-1", T0 + 60)])
    # Cleared before anyone acknowledged it: returned to normal, unacknowledged.
    wait_for(lambda: receiver.events()[-1:] == [("alert.returned", "pump-1")], timeout=15)
    with site.plane.client() as client:
        wait_for(lambda: client.list_webhooks()[0].pending == 0, timeout=30)
        (listed,) = client.list_webhooks()
    ids = receiver.ids
    assert len(ids) == len(set(ids)) == listed.delivered, (ids, listed)
    revisions = [d["data"]["revision"] for d in receiver.accepted]
    assert revisions == sorted(revisions)  # in order per alert
    assert receiver.bad_signatures == 0 and listed.id == hook.id and listed.dead == 0
    # The secret signs every delivery, but the database holds it only encrypted.
    (stored,) = site.plane.plane.store.list_webhooks()
    assert SECRET not in stored.secret and stored.secret.startswith(SecretBox.PREFIX)
    assert listed.kind == "standard"


def test_a_secret_rotation_loses_no_delivery_on_either_side_of_the_switch(
    site: Site, receiver: Receiver
) -> None:
    with site.plane.client() as client:
        hook = client.add_webhook(receiver.url, SECRET)
        site.outbox.append([raised("pump-1", T0)])
        wait_for(lambda: len(receiver.accepted) == 1, timeout=30)
        new = new_secret()
        rotated = client.rotate_webhook_secret(hook.id[:8], new, overlap_s=3600)
        assert rotated.HasField("previous_secret_until")
        # The receiver still knows only the old secret: the overlap signs with both.
        site.outbox.append([raised("pump-2", T0 + 5)])
        wait_for(lambda: len(receiver.accepted) == 2, timeout=30)
        receiver.secret = new  # the receiver switches to the new one
        site.outbox.append([raised("pump-3", T0 + 10)])
        wait_for(lambda: len(receiver.accepted) == 3, timeout=30)
        # A leaked secret: rotated with no overlap, the old one stops signing at once.
        client.rotate_webhook_secret(hook.id, new_secret(), overlap_s=0)
        # The receiver still has the secret just replaced: with an overlap it would verify.
        site.outbox.append([raised("pump-4", T0 + 15)])
        wait_for(lambda: receiver.bad_signatures >= 1, timeout=30)
    assert len(receiver.accepted) == 3, receiver.signatures
    assert [len(sig.split(" ")) for sig in receiver.signatures] == [1, 2, 2]
    assert all(part.startswith("v1,") for sig in receiver.signatures for part in sig.split())


def test_a_receiver_that_is_down_gets_the_delivery_once_when_it_returns(
    site: Site, receiver: Receiver
) -> None:
    with site.plane.client() as client:
        client.add_webhook(receiver.url, SECRET, "state=firing")
    receiver.status = 503  # up, but failing
    site.outbox.append([raised("pump-1", T0)])
    wait_for(lambda: receiver.requests >= 2, timeout=30)
    receiver.stop()  # then gone: connection refused
    with site.plane.client() as client:
        wait_for(lambda: "cannot reach" in client.list_webhooks()[0].last_error, timeout=30)
        assert client.list_webhooks()[0].pending == 1
    receiver.status = 200
    receiver.start()  # back on the same port
    wait_for(lambda: len(receiver.accepted) == 1, timeout=30)
    site.outbox.append([cleared("pump-1", T0 + 30)])  # filtered out: state=firing only
    with site.plane.client() as client:
        wait_for(lambda: client.list_webhooks()[0].delivered == 1, timeout=30)
        (listed,) = client.list_webhooks()
    assert listed.pending == 0 and listed.dead == 0
    assert receiver.events() == [("alert.firing", "pump-1")]


def test_deliveries_die_after_the_last_attempt(tmp_path: Path, receiver: Receiver) -> None:
    with open_site(tmp_path, **{**FAST_RETRIES, "webhook_max_attempts": 3}) as site:
        receiver.status = 500
        with site.plane.client() as client:
            client.add_webhook(receiver.url, SECRET)
            site.outbox.append([raised("pump-1", T0)])
            wait_for(lambda: client.list_webhooks()[0].dead == 1, timeout=30)
            (listed,) = client.list_webhooks()
        assert listed.last_error == "HTTP 500" and receiver.requests == 3


def test_logs_and_errors_show_no_path_or_credentials_of_a_webhook_url() -> None:
    assert redacted("https://hooks.example.com/services/T0/B0/XYZ?k=1") == (
        "https://hooks.example.com/…"
    )
    assert redacted("http://u:p@example.com:8080/") == "http://example.com:8080"
    assert redacted("http://[::1]:8080/x") == "http://[::1]:8080/…"
    assert redacted("http://[::1/x") == "(not a URL)"  # a log line, never an error


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/\x00", r"'\\x00' at position 19"),  # the API refuses it before
        ("http://example.com/a\u2028b", r"'\\u2028' at position 20"),
        ("http://example.com/a\tb", r"'\\t' at position 20"),
        ("http://[::1/x", "not a URL"),
    ],
)
def test_urls_the_sender_cannot_send_to_are_refused_when_added(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_url(url)
    # What the sender accepts, it can send to: httpx parses it.
    for good in ("http://[::1]:8080/x", "https://hooks.example.com/a%20b?k=1", " http://h/ "):
        assert str(httpx.URL(check_url(good))) == good.strip()


def test_secrets_stored_before_encryption_still_sign() -> None:
    box = SecretBox(b"key material")
    assert box.open("plain-old-secret-123") == "plain-old-secret-123"
    assert box.open(box.seal("s" * 20)) == "s" * 20
    with pytest.raises(IntegrityError, match="does not decrypt"):
        SecretBox(b"another key").open(box.seal("s" * 20))


@pytest.mark.parametrize(
    ("url", "secret", "filter_text", "message"),
    [
        ("ftp://example.com/x", SECRET, "", "scheme"),
        ("http:///no-host", SECRET, "", "no host"),
        ("http://example.com:99999/", SECRET, "", "bad port"),
        ("https://ops:hunter2@example.com/", SECRET, "", "carries credentials"),
        ("http://[::1/x", SECRET, "", "is not a URL: Invalid IPv6 URL"),
        ("http://example.com/a\r\nX-Injected: 1", SECRET, "", r"'\\r' at position 20"),
        ("http://example.com/a b", SECRET, "", "' ' at position 20"),
        ("http://[::1]x/", SECRET, "", r"'http://\[::1\]' cannot be sent to: Invalid port"),
        ("http://example.com/", "short-and-plain", "", "is 'whsec_' and base64"),
        ("http://example.com/", "whsec_c2hvcnQ=", "", "at least 24"),
        ("http://example.com/", SECRET, "colour=red", "unknown key 'colour'"),
        ("http://example.com/", SECRET, "state=burning", "'burning'"),
        ("http://example.com/", SECRET, "min_score=high", "not a number"),
        ("http://example.com/", SECRET, "asset", "not key=value"),
    ],
)
def test_bad_webhooks_are_clear_errors(
    site: Site, url: str, secret: str, filter_text: str, message: str
) -> None:
    with site.plane.client() as client, pytest.raises(InvalidInput, match=message):
        client.add_webhook(url, secret, filter_text)
    with site.plane.client() as client:
        assert client.list_webhooks() == []
