"""What a device or a client of the metrics port can make the control plane hold: the drift
series a device's reports name (bounded per device), and the threads of connections to the
metrics port that never finish their request (closed after a timeout, and few at a time)."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cloud.domain import PresenceUpdate
from cloud.service import metrics as metrics_module
from cloud.service.metrics import MAX_DRIFT_ASSETS, FleetCollector, PlaneMetrics
from cloud.store import open_store
from cloud.store.base import Store
from tests.support.agents import wait_for

pytestmark = pytest.mark.integration
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'plane.db'}")
    yield s
    s.close()


def _report(store: Store, name: str, health: dict[str, Any]) -> None:
    device = store.create_device(name, {}, "", NOW)
    store.add_enrollment_token(device.id, name, NOW, NOW + dt.timedelta(hours=1))
    store.enroll(name, NOW, lambda d: "cert", lambda _c: ("1", "fp", NOW))
    store.record_presence([PresenceUpdate(device.id, NOW, True, "0.1.0", {"health": health})])


def _assets(registry: CollectorRegistry, family: str, device: str) -> set[str]:
    return {
        s.labels["asset"]
        for m in registry.collect()
        if m.name == family
        for s in m.samples
        if s.labels["device"] == device
    }


def test_a_device_cannot_grow_the_scrape_with_the_asset_names_it_reports(store: Store) -> None:
    many = {f"asset-{i:04d}": {"input_shift": 1.0, "score_median": 0.5} for i in range(1000)}
    odd = {
        "x" * 5000: {"input_shift": 9.0},  # longer than any asset name
        'a"}\nfake_series 1': {"input_shift": 9.0},  # no asset is named so
    }
    _report(store, "flooder", {"drift": {**many, **odd}})
    _report(store, "honest", {"drift": {"pump-1": {"input_shift": 2.0, "score_median": 0.7}}})
    registry = CollectorRegistry()
    registry.register(FleetCollector(store, lambda: 0, lambda: True, dt.timedelta(seconds=30)))

    for family in ("autoglm_device_drift_input_shift", "autoglm_device_drift_score_median"):
        kept = _assets(registry, family, "flooder")
        # The first ones by name, so the same assets keep their series scrape after scrape.
        assert kept == {f"asset-{i:04d}" for i in range(MAX_DRIFT_ASSETS)}, (family, len(kept))
        assert _assets(registry, family, "honest") == {"pump-1"}, family
    omitted = "autoglm_device_drift_assets_omitted"
    assert registry.get_sample_value(omitted, {"device": "flooder"}) == 1002 - MAX_DRIFT_ASSETS
    assert registry.get_sample_value(omitted, {"device": "honest"}) is None  # nothing left out
    labels = {"device": "honest", "asset": "pump-1"}
    assert registry.get_sample_value("autoglm_device_drift_input_shift", labels) == 2.0


def _threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("metrics-"))


def _closed(s: socket.socket) -> bool:
    """Whether the server closed `s` (one it refused at once may be reset: it left the
    request unread)."""
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body


def test_connections_that_never_finish_a_request_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half-sent requests used to hold a thread each for ever. Now each is closed after the
    port's I/O timeout, and past MAX_CONNECTIONS a new one is closed at once, so a client of
    the metrics port holds a bounded number of threads, for a bounded time."""
    monkeypatch.setattr(metrics_module, "METRICS_IO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(metrics_module, "METRICS_CONNECTIONS", 8)
    server, port = PlaneMetrics().serve("127.0.0.1:0")
    socks: list[socket.socket] = []
    try:
        assert b"autoglm_heartbeats_total" in _scrape(port)
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            socks.append(s)
        # The server closes every one of them: the first 8 at their timeout, the rest at once.
        started = time.monotonic()
        for s in socks:
            assert _closed(s)
        closed_after = time.monotonic() - started
        assert closed_after < 8, f"half-sent requests still open {closed_after:.1f} s later"
        wait_for(lambda: _threads() <= 1, timeout=10)  # the serving thread only
        assert b"autoglm_heartbeats_total" in _scrape(port)  # and it still serves
    finally:
        for s in socks:
            s.close()
        server.shutdown()
        server.server_close()


def _trickle(port: int, every_s: float, give_up_at: float, closed: list[float]) -> None:
    """Sends a request a byte every `every_s` (never finishing its headers) until the server
    closes the connection (its time goes to `closed`) or `give_up_at` (monotonic) passes."""
    request = b"GET /metrics HTTP/1.1\r\nX-Trickle: " + b"a" * 10_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(every_s)
        for byte in request:
            if time.monotonic() > give_up_at:
                return
            try:
                s.send(bytes([byte]))
                if s.recv(1024) == b"":
                    closed.append(time.monotonic())
                    return
            except TimeoutError:
                continue  # nothing from the server yet: the next byte
            except OSError:  # reset or broken pipe: closed by the server too
                closed.append(time.monotonic())
                return


def test_connections_that_trickle_a_request_are_closed_at_their_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The I/O timeout is per read: a client sending a byte more often than that used to hold
    its connection, and with METRICS_CONNECTIONS of them no scrape got through. Now each
    connection is closed METRICS_CONNECTION_DEADLINE_S after it was accepted."""
    monkeypatch.setattr(metrics_module, "METRICS_IO_TIMEOUT_S", 5.0)
    monkeypatch.setattr(metrics_module, "METRICS_CONNECTION_DEADLINE_S", 1.0)
    monkeypatch.setattr(metrics_module, "METRICS_CONNECTIONS", 2)
    server, port = PlaneMetrics().serve("127.0.0.1:0")
    closed: list[float] = []
    started = time.monotonic()
    give_up_at = started + 15  # well past the 1 s deadline
    tricklers = [
        threading.Thread(target=_trickle, args=(port, 0.2, give_up_at, closed)) for _ in range(2)
    ]
    try:
        for t in tricklers:
            t.start()
        for t in tricklers:
            t.join(timeout=30)
        took = [round(at - started, 1) for at in closed]
        assert len(closed) == 2, f"trickling connections not closed by the server: {took}"
        assert max(took) < 12, f"trickling connections closed only after {took} s"
        assert b"autoglm_heartbeats_total" in _scrape(port)  # the slots are free again
    finally:
        server.shutdown()
        server.server_close()
