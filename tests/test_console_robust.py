"""The console's own handling of what browsers and devices send, over a fake operator API:
dates at the calendar's ends, malformed forms."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re

import pytest

from protos.autoglm.v1 import operator_pb2
from tests.support.fake_console import FakeApi, fake_app, signed_in

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
