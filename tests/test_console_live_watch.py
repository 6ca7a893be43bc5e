"""The live alert list's script in a real browser against the console with a fake API: a
refusal for too many live pages is shown as such and not retried, while a stream the browser
gave up on for any other reason (a proxy's 502 while the console restarts) is opened again."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from cloud.console import alerts
from tests.support.console import chromium
from tests.support.fake_console import GOOD, fake_app

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
WAIT_MS = 30_000


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def _serve(app: web.Application) -> tuple[str, Any]:
    """`app` on a free port, on an event loop in a thread of its own (Playwright's runs in
    this one); its URL and a function that stops it."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=1.0)  # live streams are cut at the end
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(timeout=30), "the console did not start"
    port = runner.addresses[0][1]

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)

    return f"http://127.0.0.1:{port}", stop


def _sign_in(page: Any, url: str) -> None:
    page.goto(f"{url}/login")
    page.fill("#token", GOOD)
    page.click("form.login button")
    page.wait_for_url(lambda at: "/login" not in at, timeout=WAIT_MS)


def test_too_many_live_pages_is_said_and_not_retried(browser: Any) -> None:
    app, _ = fake_app()
    app[alerts.STREAMS] = alerts.StreamSlots(per_session=0)  # every live page refused
    url, stop = _serve(app)
    watches: list[str] = []
    try:
        page = browser.new_page()
        page.on("request", lambda r: watches.append(r.url) if "/watch" in r.url else None)
        _sign_in(page, url)
        page.goto(f"{url}/alerts")
        status = page.locator("#watch-status")
        status.filter(has_text="live alert pages open").wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(3000)  # a retry would be under way by now
        assert "retrying" not in status.inner_text(), status.inner_text()
        assert len(watches) == 1, watches
    finally:
        stop()


def test_a_stream_closed_by_a_proxy_is_opened_again(browser: Any) -> None:
    app, _ = fake_app()
    url, stop = _serve(app)
    refused: list[int] = []

    def proxy(route: Any) -> None:
        if len(refused) < 2:  # the console restarting behind its proxy, twice
            refused.append(502)
            route.fulfill(status=502, body="Bad Gateway")
        else:
            route.continue_()

    try:
        page = browser.new_page()
        _sign_in(page, url)
        page.route("**/live/alerts/watch", proxy)
        page.goto(f"{url}/alerts")
        page.locator("#alerts[data-live='1']").wait_for(timeout=WAIT_MS)
        assert refused == [502, 502], refused
        assert "too many" not in page.locator("#watch-status").inner_text()
    finally:
        stop()
