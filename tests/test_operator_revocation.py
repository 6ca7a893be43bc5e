"""A revoked operator is cut off: its next call is refused at once on the replica that revoked
it (no cached token serves it), an open watch stream delivers no change after it and ends,
idle or not, the console's live page says so, and every replica hears of it (PostgreSQL's
change notification) and drops its cached tokens."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from cloud.service import guard
from cloud.service.guard import OperatorTokens
from cloud.store import open_store
from cloud.store.notify import ANY, CHANNEL, OPERATORS, ChangeListener
from cloud.store.sql import SqlStore
from cloud.tokens import hash_token
from edge_agent.errors import Unauthenticated
from protos.autoglm.v1 import operator_pb2, operator_pb2_grpc
from tests.support.agents import wait_for
from tests.support.alerting import Site, open_site, raised
from tests.support.cloud import RunningPlane
from tests.support.console import signed_in

pytestmark = pytest.mark.integration


def _watch(plane: RunningPlane, token: str, timeout: float) -> Any:
    """A raw WatchAlerts call with `token` (the client's own would retry or hide the code)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    channel = grpc.secure_channel(plane.api_address, credentials)
    stub = operator_pb2_grpc.OperatorServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    return stub.WatchAlerts(operator_pb2.WatchAlertsRequest(), metadata=metadata, timeout=timeout)


def _rest(call: Any) -> tuple[list[str], grpc.StatusCode]:
    """The alert ids a stream still delivers, and the code it ends with."""
    ids: list[str] = []
    try:
        for alert in call:
            ids.append(alert.id)
    except grpc.RpcError as exc:
        return ids, exc.code()
    return ids, grpc.StatusCode.OK


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with open_site(tmp_path, console_listen="127.0.0.1:0") as s:
        yield s


def test_a_revoked_operator_is_refused_at_once_and_its_stream_sends_nothing_more(
    site: Site,
) -> None:
    with site.plane.client() as admin:
        eve = admin.add_operator("eve", "viewer").token
    with site.plane.client(eve) as client:
        client.list_alerts(operator_pb2.ListAlertsRequest())  # her token is cached now
    call = _watch(site.plane, eve, timeout=60)
    marker = next(call)
    assert not marker.id, "the stream's first message is its marker"
    with site.plane.client() as admin:
        admin.revoke_operator("eve")
    with site.plane.client(eve) as client, pytest.raises(Unauthenticated):
        client.list_alerts(operator_pb2.ListAlertsRequest())
    # A change after the revocation: the old code sent it to her.
    site.outbox.append([raised("pump-1", time.time())])
    wait_for(lambda: len(site.alerts()) == 1, timeout=30)
    ids, code = _rest(call)
    assert ids == [] and code == grpc.StatusCode.UNAUTHENTICATED, (ids, code)
    # The admin's own calls are unaffected by the dropped cache.
    assert len(site.alerts()) == 1


@pytest.fixture
def quick_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A site whose guard checks open streams again every 0.3 s."""
    monkeypatch.setattr(guard, "TOKEN_CACHE_S", 0.3)
    with open_site(tmp_path, console_listen="127.0.0.1:0") as s:
        yield s


def test_an_idle_watch_of_a_revoked_operator_ends_and_so_does_its_live_page(
    quick_site: Site,
) -> None:
    site = quick_site
    with site.plane.client() as admin:
        eve = admin.add_operator("eve", "viewer").token
    call = _watch(site.plane, eve, timeout=60)
    assert not next(call).id
    events: list[tuple[str, str]] = []
    ready = threading.Event()

    def read_page() -> None:
        with signed_in(site.plane, eve).stream("GET", "/live/alerts/watch") as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, line[6:]))
                    ready.set()
                    if kind == "failed":
                        return

    reader = threading.Thread(target=read_page, daemon=True)
    reader.start()
    assert ready.wait(60), events
    # Both watches stay open while she may call (several checks of her token pass).
    time.sleep(1.0)
    assert reader.is_alive() and events == [("ready", "{}")], events
    with site.plane.client() as admin:
        admin.revoke_operator("eve")
    ids, code = _rest(call)  # no change comes: only the periodic check can end it
    assert ids == [] and code == grpc.StatusCode.UNAUTHENTICATED, (ids, code)
    reader.join(60)
    assert not reader.is_alive(), f"the live page did not end: {events}"
    kind, data = events[-1]
    assert kind == "failed" and json.loads(data)["status"] == 401, events


def _operator_store(tmp_path: Path) -> tuple[SqlStore, str]:
    store = open_store(f"sqlite:///{tmp_path / 'ops.sqlite3'}")
    assert isinstance(store, SqlStore)
    now = dt.datetime.now(dt.UTC)
    store.add_operator("root", hash_token("root-token"), now)
    store.add_operator("eve", hash_token("eve-token"), now, "viewer")
    return store, "eve-token"


EVE = (("authorization", "Bearer eve-token"),)


def test_a_notification_drops_cached_tokens_and_so_does_expiry(tmp_path: Path) -> None:
    store, _ = _operator_store(tmp_path)
    now = [100.0]
    tokens = OperatorTokens(store, cache_s=5.0, clock=lambda: now[0])
    try:
        assert asyncio.run(tokens.check(EVE)).name == "eve"
        store.revoke_operator("eve", dt.datetime.now(dt.UTC))  # on another replica, say
        assert asyncio.run(tokens.check(EVE)).name == "eve", "cached until told or expired"
        tokens.heard("desired")  # other changes keep the cache
        assert asyncio.run(tokens.check(EVE)).name == "eve"
        tokens.heard(OPERATORS)
        with pytest.raises(Unauthenticated):
            asyncio.run(tokens.check(EVE))
        # Without a notification (a replica that missed it): refused once the entry expires.
        store.add_operator("eve-2", hash_token("eve-2-token"), dt.datetime.now(dt.UTC), "viewer")
        eve2 = (("authorization", "Bearer eve-2-token"),)
        assert asyncio.run(tokens.check(eve2)).name == "eve-2"
        store.revoke_operator("eve-2", dt.datetime.now(dt.UTC))
        now[0] += 4.9
        assert asyncio.run(tokens.check(eve2)).name == "eve-2"
        now[0] += 0.2
        with pytest.raises(Unauthenticated):
            asyncio.run(tokens.check(eve2))
        tokens.heard(ANY)  # listening (re)started: anything may have changed
        assert not tokens._cache
    finally:
        store.close()


class _HeldLookups:
    """The real store, its token lookups held until released (a lookup under way)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.started = threading.Event()
        self.release = threading.Event()

    def operator_by_token_hash(self, token_hash: str) -> Any:
        record = self.store.operator_by_token_hash(token_hash)
        self.started.set()
        assert self.release.wait(30)
        return record


def test_a_lookup_under_way_across_a_revocation_is_not_cached(tmp_path: Path) -> None:
    store, _ = _operator_store(tmp_path)
    held = _HeldLookups(store)
    tokens = OperatorTokens(held, clock=lambda: 0.0)  # type: ignore[arg-type]

    async def run() -> None:
        lookup = asyncio.create_task(tokens.check(EVE))
        assert await asyncio.to_thread(held.started.wait, 30)
        # It read eve before her revocation commits; the revocation is heard meanwhile.
        store.revoke_operator("eve", dt.datetime.now(dt.UTC))
        tokens.forget()
        held.release.set()
        assert (await lookup).name == "eve"  # the call under way is answered
        with pytest.raises(Unauthenticated):
            await tokens.check(EVE)  # the next is not served from a stale entry

    try:
        asyncio.run(run())
    finally:
        store.close()


@pytest.mark.postgres
def test_a_revocation_is_announced_to_every_replica(pg_url: str) -> None:
    store = open_store(pg_url)
    heard: list[str] = []
    told = threading.Event()

    def on_change(topic: str) -> None:
        heard.append(topic)
        if topic in (OPERATORS, "marker"):
            told.set()

    listener = store.change_listener(on_change)
    assert isinstance(listener, ChangeListener)
    listener.start()
    try:
        assert listener.listening.wait(30)
        now = dt.datetime.now(dt.UTC)
        store.add_operator("root", hash_token("root-token"), now)
        store.add_operator("eve", hash_token("eve-token"), now, "viewer")
        store.revoke_operator("eve", now)
        assert told.wait(30), heard
        heard.clear()
        told.clear()
        store.revoke_operator("eve", now)  # already revoked: nothing changed, nothing said
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify(%s, 'marker')", (CHANNEL,))  # heard after it
        assert told.wait(30), heard
        assert heard == ["marker"], heard
    finally:
        listener.stop()
        store.close()
