"""The console's own handling of what browsers and devices send, over a fake operator API:
dates at the calendar's ends, malformed forms, sign-in limits behind a proxy,
slow connections, live streams per session and operator, big fleets (paged, rendered off
the event loop, live parts answered 304 while unchanged)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import html
import json
import logging
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from protos.autoglm.v1 import operator_pb2
from tests.support.fake_console import GOOD, OTHER, FakeApi, fake_app, signed_in

pytestmark = pytest.mark.unit


def _banner(page: str) -> str:
    found = re.search(r'role="alert">([^<]*)', page)
    return found.group(1) if found else page[-300:]


@pytest.mark.parametrize("year", [1, 9999])
def test_an_alert_stamped_at_the_calendars_ends_has_a_page(year: int) -> None:
    api = FakeApi()
    alert = operator_pb2.Alert(id="a1", device_id="d1", device_name="edge", asset="pump")
    at = (
        dt.datetime(year, 1, 1, 0, 30, tzinfo=dt.UTC)
        if year == 1
        else dt.datetime(year, 12, 31, 23, 50, tzinfo=dt.UTC)
    )
    alert.first_seen.FromDatetime(at)
    alert.last_seen.FromDatetime(at)
    api.alerts.append(alert)
    # A window of another raise, so the scan compares its start with first seen + look-ahead.
    window = operator_pb2.CapturedWindow(device_id="d1", sequence=1, alert_id="other")
    window.capture.window_start.FromDatetime(at)
    api.captures.append(window)

    async def run() -> tuple[int, str]:
        app, _ = fake_app(api)
        client = await signed_in(app)
        try:
            response = await client.get("/alerts/a1")
            return response.status, await response.text()
        finally:
            await client.close()

    status, page = asyncio.run(run())
    assert status == 200, _banner(page)
    assert api.capture_requests, "the captured window was not looked for"


FORMS = [
    ("application/x-www-form-urlencoded; charset=bogus", b"token=abc", "charset"),
    ("application/x-www-form-urlencoded; charset=utf-16", b"token=abc", "charset"),
    ("multipart/form-data", b"token=abc", "boundary"),
    ("multipart/form-data; boundary=zz", b"garbage", ""),
    (
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
        b"Content-Type: text/plain; charset=bogus\r\n\r\nabc\r\n--zz--\r\n",
        "charset",
    ),
    (
        "multipart/form-data; boundary=zz",
        b'--zz\r\nContent-Disposition: form-data; name="token"\r\n'
        b"Content-Transfer-Encoding: bogus\r\n\r\nabc\r\n--zz--\r\n",
        "encoding",
    ),
]


@pytest.mark.parametrize(("content_type", "body", "words"), FORMS)
def test_a_malformed_form_is_refused_with_400_and_no_traceback(
    content_type: str, body: bytes, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> list[tuple[int, str]]:
        app, _ = fake_app()
        client = await signed_in(app)
        try:
            csrf = re.search(
                r'name="_csrf" value="([^"]+)"', await (await client.get("/fleet")).text()
            )
            assert csrf
            # Signed in (an action's form, the CSRF token in its header), then signed out (the
            # sign-in form).
            answers = []
            for path, headers in (
                ("/alerts/a1/ack", {"X-CSRF-Token": csrf.group(1)}),
                ("/login", {}),
            ):
                response = await client.post(
                    path,
                    data=body,
                    headers={"Content-Type": content_type, **headers},
                    allow_redirects=False,
                )
                answers.append((response.status, await response.text()))
                client.session.cookie_jar.clear()
            return answers
        finally:
            await client.close()

    with caplog.at_level(logging.ERROR):
        answers = asyncio.run(run())
    for status, page in answers:
        assert status == 400, (status, _banner(page))
        assert _banner(page).startswith("Refused: the form"), _banner(page)
        assert words in _banner(page), _banner(page)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_behind_a_trusted_proxy_wrong_tokens_lock_out_only_their_client() -> None:
    from cloud.console.app import LOGIN_FAILURES

    async def run() -> dict[str, int]:
        # The test client connects from 127.0.0.1: the proxy.
        app, _ = fake_app(trusted_proxies=["127.0.0.1", "10.1.0.0/16"])
        client = await signed_in(app)
        client.session.cookie_jar.clear()

        async def sign_in(token: str, forwarded: str) -> int:
            response = await client.post(
                "/login",
                data={"token": token},
                headers={"X-Forwarded-For": forwarded},
                allow_redirects=False,
            )
            client.session.cookie_jar.clear()
            return response.status

        try:
            for i in range(LOGIN_FAILURES):
                # What the guesser writes into the header itself (left) is not believed; the
                # address the proxies appended (a second, trusted hop in between) is.
                assert await sign_in(f"agt_op_guess{i}", f"1.2.3.{i}, 203.0.113.5, 10.1.2.3") == 401
            return {
                "guesser": await sign_in(GOOD, "203.0.113.5"),
                "guesser, another forged left part": await sign_in(GOOD, "9.9.9.9, 203.0.113.5"),
                "another operator": await sign_in(GOOD, "198.51.100.7"),
                "another operator, through both proxies": await sign_in(
                    GOOD, "198.51.100.8, 10.1.0.9"
                ),
            }
        finally:
            await client.close()

    assert asyncio.run(run()) == {
        "guesser": 429,
        "guesser, another forged left part": 429,
        "another operator": 303,
        "another operator, through both proxies": 303,
    }


def test_without_trusted_proxies_x_forwarded_for_is_ignored() -> None:
    from cloud.console.app import LOGIN_FAILURES

    async def run() -> int:
        app, _ = fake_app()
        client = await signed_in(app)
        client.session.cookie_jar.clear()
        try:
            for i in range(LOGIN_FAILURES):
                await client.post(
                    "/login",
                    data={"token": f"agt_op_guess{i}"},
                    headers={"X-Forwarded-For": f"203.0.113.{i}"},
                )
            response = await client.post(
                "/login",
                data={"token": GOOD},
                headers={"X-Forwarded-For": "198.51.100.7"},
                allow_redirects=False,
            )
            assert "from 127.0.0.1" in await response.text()
            return response.status
        finally:
            await client.close()

    assert asyncio.run(run()) == 429


def test_trusted_proxies_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cloud.config import CloudConfig

    assert CloudConfig(state_dir=tmp_path).console_trusted_proxies == []
    config = CloudConfig(state_dir=tmp_path, console_trusted_proxies=["10.0.0.5", "fd00::/8"])
    assert config.console_trusted_proxies == ["10.0.0.5", "fd00::/8"]
    with pytest.raises(ValidationError, match=r"'proxy\.local' is not an IP address or network"):
        CloudConfig(state_dir=tmp_path, console_trusted_proxies=["10.0.0.5", "proxy.local"])


def test_a_connection_without_a_complete_request_is_closed_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiohttp

    from cloud.console import alerts
    from cloud.console.app import ConsoleServer
    from cloud.console.sessions import SessionSeal
    from tests.support.fake_console import FakeApi

    timeout_s = 0.5

    async def run() -> dict[str, float]:
        server = ConsoleServer(
            "127.0.0.1:0", FakeApi(), SessionSeal(b"k" * 32), request_timeout_s=timeout_s
        )  # type: ignore[arg-type]
        await server.start()
        try:

            async def held(first: bytes, trickle: bytes = b"") -> float:
                """Seconds until the console closed a connection that sent `first`, then
                `trickle` a byte every 50 ms."""
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                started = time.monotonic()
                writer.write(first)
                for byte in trickle:
                    if reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)
                try:
                    await asyncio.wait_for(reader.read(), 20)
                finally:
                    writer.close()
                return time.monotonic() - started

            held_for = dict(
                zip(
                    [
                        "nothing",
                        "half a request line",
                        "headers, no blank line",
                        "trickled",
                        "one request, then idle",
                    ],
                    await asyncio.gather(
                        held(b""),
                        held(b"GET /login HT"),
                        held(b"GET /login HTTP/1.1\r\nHost: x\r\n"),
                        held(b"GET /login HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200),
                        held(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                    ),
                    strict=True,
                )
            )
            # An event stream is a request being answered: it stays open past the timeout.
            jar = aiohttp.CookieJar(unsafe=True)  # keeps cookies of an IP address's site
            async with aiohttp.ClientSession(
                f"http://127.0.0.1:{server.port}", cookie_jar=jar
            ) as browser:
                await browser.post("/login", data={"token": GOOD})
                async with browser.get("/live/alerts/watch") as stream:
                    assert await stream.content.readuntil(b"\n\n") == b"event: ready\ndata: {}\n\n"
                    started = time.monotonic()
                    while time.monotonic() - started < 4 * timeout_s:
                        assert await stream.content.readuntil(b"\n\n") == b": keepalive\n\n"
            return held_for
        finally:
            await server.stop()

    monkeypatch.setattr(alerts, "KEEPALIVE_S", timeout_s / 5)
    held_for = asyncio.run(run())
    for what, seconds in held_for.items():
        # Closed after about the timeout, not kept (aiohttp's default keeps them an hour).
        assert seconds < timeout_s + 10, (what, seconds)


def test_a_form_sent_too_slowly_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud.console import context

    monkeypatch.setattr(context, "FORM_READ_S", 0.5)

    async def run() -> tuple[bytes, float]:
        app, _ = fake_app()
        client = await signed_in(app)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
            started = time.monotonic()
            writer.write(
                b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken="
            )
            answer = await asyncio.wait_for(reader.read(4096), 20)
            writer.close()
            return answer, time.monotonic() - started
        finally:
            await client.close()

    answer, seconds = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"the form did not arrive within 0.5 s" in answer, answer[-500:]
    assert seconds < 10, seconds


def test_live_alert_streams_are_capped_per_session_and_per_operator() -> None:
    from cloud.console.alerts import MAX_STREAMS_PER_OPERATOR, MAX_STREAMS_PER_SESSION

    async def run() -> dict[str, object]:
        app, api = fake_app()
        sessions = [await signed_in(app)]
        opened: list[object] = []

        async def open_stream(client: object) -> tuple[int, str]:
            # Refused with a `failed` event in a stream: a browser's EventSource is told
            # nothing of a refused response's status, so could not tell it from a proxy's 502.
            response = await client.get("/live/alerts/watch")  # type: ignore[attr-defined]
            assert response.status == 200, (response.status, await response.text())
            first = await response.content.readuntil(b"\n\n")
            if first == b"retry: 60000\n\n":
                event, _, data = (await response.content.readuntil(b"\n\n")).partition(b"\n")
                assert event == b"event: failed", (event, data)
                doc = json.loads(data.removeprefix(b"data: "))
                response.close()
                return doc["status"], doc["error"]
            assert first == b"event: ready\ndata: {}\n\n", first
            opened.append(response)
            return 200, ""

        try:
            results: dict[str, object] = {}
            for _ in range(MAX_STREAMS_PER_SESSION):
                assert await open_stream(sessions[0]) == (200, "")
            results["session full"] = await open_stream(sessions[0])
            while len(opened) < MAX_STREAMS_PER_OPERATOR:
                if len(opened) % MAX_STREAMS_PER_SESSION == 0:
                    sessions.append(await signed_in(app))
                assert await open_stream(sessions[-1]) == (200, "")
            sessions.append(await signed_in(app))
            results["operator full"] = await open_stream(sessions[-1])
            other = await signed_in(app, OTHER)
            sessions.append(other)
            results["another operator"] = await open_stream(other)
            results["API streams"] = api.watchers
            # A closed stream frees its place.
            opened.pop(0).close()  # type: ignore[attr-defined]
            await asyncio.sleep(0.2)
            results["after one closed"] = await open_stream(sessions[0])
            return results
        finally:
            for response in opened:
                response.close()  # type: ignore[attr-defined]
            for client in sessions:
                await client.close()

    results = asyncio.run(run())
    assert results["session full"] == (
        429,
        f"Refused: this browser session has {MAX_STREAMS_PER_SESSION} live alert pages open, "
        "the most allowed; close one and reload",
    )
    status, words = results["operator full"]  # type: ignore[misc]
    assert status == 429 and f"this operator has {MAX_STREAMS_PER_OPERATOR}" in words, words
    assert results["another operator"] == (200, "")
    assert results["API streams"] == MAX_STREAMS_PER_OPERATOR + 1
    assert results["after one closed"] == (200, "")


def _fleet(count: int) -> FakeApi:
    api = FakeApi()
    for i in range(count):
        d = operator_pb2.Device(
            id=f"{i:036d}",
            name=f"edge-{i % 97:02d}",  # names repeat: the order must still be total
            labels={"site": "a", "line": str(i % 7)},
            state=operator_pb2.Device.STATE_ACTIVE,
            online=True,
            profile="p",
        )
        d.status.model_version = "3"
        d.last_seen.GetCurrentTime()
        d.status.health.drift["pump"].input_shift = 4.0
        api.devices.append(d)
    rollout = operator_pb2.Rollout(
        id="r" * 36, model_name="m", model_version="2", state=operator_pb2.Rollout.STATE_RUNNING
    )
    rollout.waves.add(index=0, size="100%", target_devices=count)
    for d in api.devices:
        rollout.devices.add(
            device_id=d.id, device_name=d.name, state="shadowing", shadow_windows=50,
            shadow_agreement=0.9,
        )  # fmt: skip
    api.rollouts.append(rollout)
    return api


async def _lag_while(work: Awaitable[Any]) -> tuple[Any, float, float]:
    """`work`'s result, the event loop's longest stall meanwhile, and how long it took."""
    stalls: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.005)
            stalls.append(time.monotonic() - started - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.monotonic()
    result = await work
    elapsed = time.monotonic() - started
    tick.cancel()
    return result, max(stalls), elapsed


def test_big_pages_leave_the_event_loop_responsive() -> None:
    async def run() -> dict[str, tuple[float, float]]:
        app, _ = fake_app(_fleet(10_000))
        client = await signed_in(app)
        try:
            measured = {}
            for path in ("/fleet", "/rollouts/" + "r" * 36, "/live/rollouts/" + "r" * 36):

                async def get(path: str = path) -> int:
                    response = await client.get(path)
                    await response.read()
                    return response.status

                status, stall, elapsed = await _lag_while(get())
                assert status == 200, (path, status)
                measured[path] = (stall, elapsed)
            return measured
        finally:
            await client.close()

    # The test process's own heap (every module pytest loaded) out of the garbage collector's
    # full passes: those stall every thread, and their length would measure the heap, not the
    # console.
    gc.freeze()
    try:
        measured = asyncio.run(run())
    finally:
        gc.unfreeze()
    for path, (stall, elapsed) in measured.items():
        # Rendered on the loop, the stall was the whole rendering (1.7 s for /fleet here).
        assert stall < max(0.1, elapsed / 4), (
            f"{path}: loop stalled {stall:.3f} s of {elapsed:.3f} s"
        )


def test_the_fleet_pages_show_every_device_exactly_once() -> None:
    from cloud.console.fleet import PAGE_SIZE

    api = _fleet(2 * PAGE_SIZE + 7)

    async def run() -> tuple[list[str], list[str]]:
        app, _ = fake_app(api)
        client = await signed_in(app)
        try:
            shown: list[str] = []
            summaries: list[str] = []
            url: str | None = "/fleet?selector=site%3Da"
            while url is not None:
                text = await (await client.get(url)).text()
                shown += re.findall(r'<a href="/devices/([0-9]+)"', text)
                summaries += re.findall(r'<p class="summary">([^<]*)</p>', text)
                following = re.search(r'<a href="([^"]+)" rel="next">', text)
                url = html.unescape(following.group(1)) if following else None
                assert len(summaries) <= 5, summaries
            past = await client.get("/fleet?page=99")  # past the end: the last page
            assert "page 3 of 3" in await past.text()
            bad = await client.get("/fleet?page=x")
            assert (
                bad.status == 400 and "page &#x27;x&#x27; is not a page number" in await bad.text()
            )
            superscript = await client.get("/fleet?page=%C2%B2")  # "\u00b2".isdigit() is True
            said = await superscript.text()
            assert superscript.status == 400 and "is not a page number" in said, said[:300]
            return shown, summaries
        finally:
            await client.close()

    shown, summaries = asyncio.run(run())
    assert sorted(shown) == sorted(d.id for d in api.devices), len(shown)
    assert len(shown) == len(set(shown)) == 2 * PAGE_SIZE + 7
    assert summaries[0] == (
        f"{2 * PAGE_SIZE + 7} device(s) matching site=a; showing 1-{PAGE_SIZE} (page 1 of 3)"
    ), summaries
    assert summaries[2].endswith(f"showing {2 * PAGE_SIZE + 1}-{2 * PAGE_SIZE + 7} (page 3 of 3)")


def test_the_live_rollout_is_answered_304_until_it_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.console import rollouts

    monkeypatch.setattr(rollouts, "clock", lambda: 1_700_000_000.0)  # no minute turns over
    api = _fleet(50)
    path = "/live/rollouts/" + "r" * 36

    async def run() -> list[int]:
        app, _ = fake_app(api)
        client = await signed_in(app)
        try:
            page = await (await client.get("/rollouts/" + "r" * 36)).text()
            held = re.search(r'data-version="([^"]+)"', page)
            assert held, "the page carries no version of its live part"
            version = html.unescape(held.group(1))
            statuses = []
            response = await client.get(path, headers={"If-None-Match": version})
            statuses.append(response.status)
            assert response.headers["ETag"] == version and not await response.read()
            api.rollouts[0].devices[0].state = "updated"
            response = await client.get(path, headers={"If-None-Match": version})
            statuses.append(response.status)
            assert "1 of 50 devices updated" in await response.text()
            response = await client.get(path, headers={"If-None-Match": response.headers["ETag"]})
            statuses.append(response.status)
            return statuses
        finally:
            await client.close()

    assert asyncio.run(run()) == [304, 200, 304]
