"""The console's own handling of what browsers and devices send, over a fake operator API:
dates at the calendar's ends."""

from __future__ import annotations

import asyncio
import datetime as dt
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
