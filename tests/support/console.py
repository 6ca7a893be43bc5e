"""The web console in tests: a signed-in HTTP client, the CSRF token of a page, an edge
site with predictions and an alert around now, Debian's Chromium under Playwright."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np

from edge_agent.capture import ALERT, CapturedWindow
from edge_agent.outbox import CAPTURE, PREDICTION
from edge_agent.wire import capture_record
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.support.agents import wait_for
from tests.support.alerting import Site, raised
from tests.support.cloud import RunningPlane

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "pump-1:console"  # the edge's alert key of the raise feed_alert writes


def console_url(plane: RunningPlane) -> str:
    return f"http://127.0.0.1:{plane.plane.console_port}"


def signed_in(plane: RunningPlane, token: str) -> httpx.Client:
    """An HTTP client holding a console session for `token`."""
    client = httpx.Client(base_url=console_url(plane), timeout=20)
    response = client.post("/login", data={"token": token, "next": "/fleet"})
    assert response.status_code == 303, response.text
    return client


def csrf_of(page_html: str) -> str:
    found = re.search(r'name="_csrf" value="([^"]+)"', page_html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def scored(asset: str, at: float, score: float) -> tuple[int, bytes]:
    """A prediction record whose top sensors (flow, then current) grow with the score."""
    record = agent_pb2.Record(
        prediction=agent_pb2.Prediction(
            asset=asset,
            score=score,
            anomalous=score >= 1.0,
            model_version="3",
            contributions={"flow": 0.4 * score, "current": 0.1 + 0.1 * score, "vibration": 0.05},
        )
    )
    record.prediction.window_start.FromNanoseconds(int((at - 24) * 1e9))
    record.prediction.window_end.FromNanoseconds(int(at * 1e9))
    return PREDICTION, record.SerializeToString()


def captured(end: float, rows: int = 24) -> tuple[int, bytes]:
    """The raw window the device captured with the raise (flow climbing away from normal)."""
    sensors = ("flow", "current", "vibration", "temperature")
    values = np.full((rows, len(sensors)), 10.0, dtype=np.float32)
    values[:, 0] += np.linspace(0, 6, rows, dtype=np.float32)
    values[:, 1] += np.linspace(0, 2, rows, dtype=np.float32)
    window = CapturedWindow(
        reason=ALERT,
        asset="pump-1",
        model_version="3",
        alert_key=KEY,
        score=1.6,
        window_start=end - (rows - 1),
        period_s=1.0,
        sensors=sensors,
        values=values,
        mask=np.ones_like(values),
        input_center=np.full(len(sensors), 10.0, dtype=np.float32),
        input_scale=np.full(len(sensors), 0.5, dtype=np.float32),
    )
    return CAPTURE, capture_record(window)


def feed_alert(site: Site, windows: int = 40) -> operator_pb2.Alert:
    """`windows` predictions of pump-1 ending now, rising past the threshold, and the raise
    event; returns the alert once the control plane has it."""
    now = time.time()
    start = now - windows * 2
    records = [
        scored("pump-1", start + 2 * i, 0.2 + 1.4 * max(0, i - windows + 12) / 12)
        for i in range(windows)
    ]
    site.outbox.append([*records, raised("pump-1", now - 6, score=1.6, key=KEY), captured(now - 6)])
    wait_for(lambda: len(site.alerts()) == 1, timeout=20)
    wait_for(lambda: _predictions(site) >= windows, timeout=20)
    return site.alerts()[0]


def _predictions(site: Site) -> int:
    with site.plane.client() as client:
        request = operator_pb2.QueryPredictionsRequest(device="edge-1", limit=10_000)
        return len(client.query_predictions(request))


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, under Playwright (no browser is downloaded)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # As root (containers, CI) Chromium refuses to start with its sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()
