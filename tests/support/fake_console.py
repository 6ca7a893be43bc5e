"""The console's web app over a fake operator API, in process: for what the console itself
does with requests (forms, paging, rendering, limits) without a control plane behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud.console.app import make_app
from cloud.console.sessions import SessionSeal
from edge_agent.errors import NotFound, Unauthenticated
from protos.autoglm.v1 import agent_pb2, operator_pb2

GOOD = "agt_op_good"
OTHER = "agt_op_other"  # a second live operator


class FakeCalls:
    """The calls of one operator token against FakeApi's lists."""

    def __init__(self, api: FakeApi, token: str) -> None:
        self.api, self.token = api, token

    async def check(self) -> None:
        if self.token not in (GOOD, OTHER):
            raise Unauthenticated("not a live operator token")

    async def list_devices(self, selector: str = "") -> list[operator_pb2.Device]:
        return self.api.devices

    async def get_device(self, device: str) -> operator_pb2.Device:
        return self.api.devices[0]

    async def predictions(self, request: Any) -> list[agent_pb2.Prediction]:
        return []

    async def list_rollouts(self, active_only: bool = False) -> list[operator_pb2.Rollout]:
        return self.api.rollouts

    async def get_rollout(self, rollout_id: str) -> operator_pb2.Rollout:
        for r in self.api.rollouts:
            if r.id == rollout_id:
                return r
        raise NotFound(f"no rollout {rollout_id}")

    async def list_alerts(self, request: Any) -> list[operator_pb2.Alert]:
        return self.api.alerts

    async def get_alert(self, alert_id: str) -> operator_pb2.Alert:
        for a in self.api.alerts:
            if a.id == alert_id:
                return a
        raise NotFound(f"no alert {alert_id}")

    async def captures(self, request: Any) -> AsyncIterator[operator_pb2.CapturedWindow]:
        self.api.capture_requests.append(request)
        for window in self.api.captures:
            yield window

    async def watch_alerts(self) -> AsyncIterator[operator_pb2.Alert]:
        self.api.watchers += 1
        try:
            yield operator_pb2.Alert()  # the stream's marker
            while True:
                await asyncio.sleep(3600)
        finally:
            self.api.watchers -= 1


class FakeApi:
    """Devices, rollouts, alerts and captured windows the console's calls answer with."""

    def __init__(self) -> None:
        self.devices: list[operator_pb2.Device] = []
        self.rollouts: list[operator_pb2.Rollout] = []
        self.alerts: list[operator_pb2.Alert] = []
        self.captures: list[operator_pb2.CapturedWindow] = []
        self.capture_requests: list[Any] = []
        self.watchers = 0

    def as_operator(self, token: str) -> FakeCalls:
        return FakeCalls(self, token)

    async def close(self) -> None:
        pass


def fake_app(api: FakeApi | None = None, **settings: Any) -> tuple[web.Application, FakeApi]:
    api = api or FakeApi()
    return make_app(api, SessionSeal(b"k" * 32), **settings), api  # type: ignore[arg-type]


async def signed_in(app: web.Application, token: str = GOOD) -> TestClient[Any, Any]:
    """A started test client of `app` holding a session for `token`."""
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    response = await client.post("/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303, await response.text()
    return client
