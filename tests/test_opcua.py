"""OPC UA in: a real agent data path subscribed to asyncua's own server over Basic256Sha256
SignAndEncrypt with certificates, values with source timestamps, to windows, a scored
prediction and an alert on an injected fault, through a server restart (session opened
again after the backoff); bad values and statuses are counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.local_broker import free_port
from edge_agent.config import IngestLimits, load_agent_config
from edge_agent.errors import ConfigError
from edge_agent.ingest.clocks import CLOCK_MIN_MESSAGES
from edge_agent.ingest.decode import Decoder, TopicRoutes
from edge_agent.ingest.opcua import OpcUaSession, sessions
from tests.support.agents import wait_for
from tests.support.broker import Broker
from tests.support.bundles import train_small
from tests.support.datapath import pump
from tests.support.opcua_server import OpcServer, make_certificate
from tests.support.sensordata import SENSORS
from tests.support.site_agent import SiteAgent
from tests.support.sparkplug_peers import read_fault, start_host

APP_URI = "urn:autoglm:edge-agent"
NOW = 1_700_000_000.0


def _source(server: OpcServer, **extra: Any) -> dict[str, Any]:
    nodes = [{"sensor": s, "node_id": server.node_id(s)} for s in SENSORS]
    return {"endpoint": server.endpoint, "nodes": nodes, "publishing_interval_ms": 20,
            "timeout_s": 4, **extra}  # fmt: skip


def _config(tmp_path: Path, source: dict[str, Any], **extra: Any) -> Any:
    return load_agent_config(
        None,
        {"state_dir": tmp_path / "agent", "assets": [{"name": "pump-1", "opcua": source}],
         **extra},
    )  # fmt: skip


async def _read_alert_nodes(url: str) -> tuple[object, object]:
    from asyncua.client.client import Client

    async with Client(url) as client:
        ns = await client.get_namespace_index("urn:autoglm:alerts")
        fault = await client.get_node(f"ns={ns};s=pump-1.Fault").read_value()
        score = await client.get_node(f"ns={ns};s=pump-1.Score").read_value()
    return fault, score


def test_config_refuses_bad_node_ids_and_security_without_certificates(tmp_path: Path) -> None:
    server = OpcServer(SENSORS)
    with pytest.raises(ConfigError, match="not an OPC UA node id"):
        _config(tmp_path, {**_source(server), "nodes": [{"sensor": "flow", "node_id": "Flow"}]})
    with pytest.raises(ConfigError, match="needs certificate and private_key"):
        _config(tmp_path, _source(server, security="Basic256Sha256"))
    with pytest.raises(ConfigError, match="endpoint"):
        _config(tmp_path, {**_source(server), "endpoint": "http://x"})


def test_an_unreachable_server_is_counted_and_tried_again(tmp_path: Path) -> None:
    server = OpcServer(SENSORS, port=1)  # nothing listens on port 1
    config = _config(tmp_path, _source(server, timeout_s=0.5))
    routes = TopicRoutes(config.assets, SENSORS)
    base = Decoder(routes, IngestLimits())
    (session,) = sessions(config.assets, routes, base, lambda _: None)
    assert isinstance(session, OpcUaSession)
    session.start()
    try:
        wait_for(lambda: base.drops["opcua_unreachable"] >= 2, timeout=30)
    finally:
        session.stop()
    assert not session._thread.is_alive()  # stopped while waiting out its backoff
    (fresh,) = sessions(config.assets, routes, base, lambda _: None)
    fresh.stop()  # never started: nothing to wait for
    fresh.start()
    fresh.stop()  # at once after starting (a model swap): the stop is not lost
    assert not fresh._thread.is_alive()


def test_a_stamp_that_is_no_time_falls_back_and_a_sentinel_value_is_dropped(
    tmp_path: Path,
) -> None:
    """asyncua DataValues as a server sends them: a SourceTimestamp of 1601-01-01 (OPC UA's
    minimum, "not set") falls back to the ServerTimestamp; with no usable stamp at all the
    reading is a bad timestamp; a float32 'no data' value (3.4e38) is out of range."""
    import datetime as dt

    from asyncua import ua

    config = _config(tmp_path, _source(OpcServer(SENSORS)))
    routes = TopicRoutes(config.assets, SENSORS)
    base = Decoder(routes, IngestLimits(), clock=lambda: NOW)
    delivered: list[object] = []
    (session,) = sessions(config.assets, routes, base, delivered.append)
    assert isinstance(session, OpcUaSession)
    session.clock = lambda: NOW
    target = next(iter(session.targets.values()))[0]
    unset = dt.datetime(1601, 1, 1)
    server_time = dt.datetime.fromtimestamp(NOW - 1, dt.UTC).replace(tzinfo=None)

    def value(v: float, source: dt.datetime | None, server: dt.datetime | None) -> Any:
        return ua.DataValue(ua.Variant(v), SourceTimestamp=source, ServerTimestamp=server)

    session._take(target, 1.5, value(1.5, unset, server_time))
    assert delivered == [(target.asset, target.sensor, NOW - 1, 1.5)]
    session._take(target, 2.5, value(2.5, unset, unset))
    session._take(target, 3.4028235e38, value(3.4028235e38, server_time, None))
    assert len(delivered) == 1
    assert {k: v for k, v in base.drops.items() if v} == {"bad_timestamp": 1, "out_of_range": 1}


@pytest.mark.parametrize("skewed", [SENSORS, SENSORS[-1:]], ids=["server", "one-node"])
def test_a_server_clock_ahead_is_followed_and_one_skewed_node_is_outvoted(
    tmp_path: Path, skewed: tuple[str, ...]
) -> None:
    """Source timestamps 10 min ahead on every node (a PLC's clock): the asset's clock follows
    after a few values, as it does for MQTT, instead of every value dropped as future. Ahead
    on one node of four: that node is reported and its values dropped, the others kept."""
    import datetime as dt

    from asyncua import ua

    config = _config(tmp_path, _source(OpcServer(SENSORS)))
    routes = TopicRoutes(config.assets, SENSORS)
    base = Decoder(routes, IngestLimits(), clock=lambda: NOW)
    delivered: list[tuple[int, int, float, float]] = []
    (session,) = sessions(config.assets, routes, base, delivered.append)
    assert isinstance(session, OpcUaSession)
    session.clock = lambda: NOW
    targets = [t for ts in session.targets.values() for t in ts]
    assert sorted(SENSORS[t.sensor] for t in targets) == sorted(SENSORS)
    for i in range(50):
        for target in targets:
            ahead = 600.0 if SENSORS[target.sensor] in skewed else 0.0
            stamp = dt.datetime.fromtimestamp(NOW + ahead + i * 0.1, dt.UTC).replace(tzinfo=None)
            session._take(target, 1.0, ua.DataValue(ua.Variant(1.0), SourceTimestamp=stamp))
    kept = len(delivered)
    if len(skewed) == len(SENSORS):
        assert kept >= 200 - CLOCK_MIN_MESSAGES, (kept, dict(base.drops))
        assert abs(base.clock_offset(0) - 600) < 10, base.clock_offset(0)
        assert base.sensor_clocks.skews == {}
    else:
        assert kept == 150 and base.drops["ts_future"] == 50, (kept, dict(base.drops))
        assert abs(base.clock_offset(0)) < 10, base.clock_offset(0)
        assert base.sensor_clocks.skews == {f"pump-1/{skewed[0]}": pytest.approx(600, abs=10)}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_asyncua_server_drives_the_agent_to_an_alert_over_signed_and_encrypted_sessions(
    tmp_path: Path, broker: Broker
) -> None:
    bundle, key = train_small(tmp_path / "model")
    pki = tmp_path / "pki"
    server_cert = make_certificate(pki, "server", "urn:autoglm:test-plant", server=True)
    client_cert, client_key = make_certificate(pki, "agent", APP_URI, server=False)
    rows = np.vstack([pump(200, faulty=False, seed=1), pump(150, faulty=True, seed=2)])
    anchor = time.time() - rows.shape[0] - 10
    hmi_port = free_port()
    # Notifications report changes (status or value): the values before the stream differ.
    server = OpcServer(SENSORS, server_cert).start(np.zeros(len(SENSORS)), anchor - 1)
    source = _source(
        server, security="Basic256Sha256", mode="SignAndEncrypt", certificate=client_cert,
        private_key=client_key, server_certificate=server_cert[0],
    )  # fmt: skip
    config = _config(
        tmp_path,
        source,
        mqtt={"host": "127.0.0.1", "port": broker.port},
        model={"bundle": bundle},
        decisions={"clear_at": 0.95},
        sparkplug_out={"group": "plant", "edge_node": "autoglm-1"},
        opcua_out={"listen": f"127.0.0.1:{hmi_port}"},
    )
    agent = SiteAgent(tmp_path, config, bundle, key)
    runtime = agent.runtime
    (session,) = runtime.sources.opcua
    reader, lines = start_host(broker.port, "autoglm-1")  # a SCADA host reads the alert
    try:
        runtime.start()
        wait_for(lambda: session.subscribed.is_set(), timeout=60)
        for i in range(rows.shape[0]):
            if i == 100:  # the server restarts with the last values; the agent comes back
                server.stop()
                wait_for(lambda: not session.subscribed.is_set(), timeout=60)
                server = OpcServer(SENSORS, server_cert, port=server.port)
                server.start(rows[i - 1], anchor + i - 1)
                wait_for(lambda: session.subscribed.is_set(), timeout=120)
            seen = session.notifications
            server.write(rows[i], anchor + i)
            wait_for(lambda s=seen: session.notifications >= s + len(SENSORS), timeout=30)
        assert session.sessions == 2  # opened again after the restart
        first = agent.first_alert(after=anchor + 200)
        assert read_fault(lines)["metrics"]["autoglm/score"] == first.score
        # And as OPC UA nodes an HMI reads, from the agent's own server (asyncua's client).
        fault, score = asyncio.run(_read_alert_nodes(f"opc.tcp://127.0.0.1:{hmi_port}/autoglm/"))
        assert fault is True and score == first.score
    finally:
        reader.kill()
        agent.close()
        server.stop()


def test_the_simulator_serves_the_stream_as_an_opc_ua_server(tmp_path: Path) -> None:
    import threading

    from cloud.local_broker import free_port
    from edge_agent.simulate import pump_stream
    from edge_agent.simulate_servers import serve_opcua

    stream = pump_stream(5, [], seed=1)
    port = free_port()
    said: list[str] = []
    threading.Thread(
        target=serve_opcua, args=("127.0.0.1", port, [stream], 1.0, said.append), daemon=True
    ).start()
    wait_for(lambda: bool(said), timeout=30)
    nodes = [{"sensor": s, "node_id": f"ns=2;s=Pump1.{s}"} for s in stream.sensors]
    source = {"endpoint": f"opc.tcp://127.0.0.1:{port}/", "nodes": nodes,
              "publishing_interval_ms": 20}  # fmt: skip
    config = _config(tmp_path, source)
    routes = TopicRoutes(config.assets, list(stream.sensors))
    base = Decoder(routes, IngestLimits())
    got: list[Any] = []
    (session,) = sessions(config.assets, routes, base, got.append)
    session.start()
    try:
        wait_for(lambda: len(got) >= 2 * len(stream.sensors), timeout=30)
    finally:
        session.stop()
    assert {g[1] for g in got} == set(range(len(stream.sensors))) and base.drops.total() == 0


def test_an_alert_server_that_cannot_listen_is_said_not_fatal(tmp_path: Path) -> None:
    import socket

    from edge_agent.decisions import AlertEvent
    from edge_agent.opcua_out import OpcUaAlerts

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = load_agent_config(
        None,
        {"state_dir": tmp_path, "assets": [{"name": "pump-1", "topics": ["p/+"]}],
         "opcua_out": {"listen": f"127.0.0.1:{taken.getsockname()[1]}"}},
    )  # fmt: skip
    assert config.opcua_out is not None
    server = OpcUaAlerts(config.opcua_out, ["pump-1"])
    with pytest.raises(Exception, match="opcua_out: cannot serve"):
        server.start()
    event = AlertEvent("raised", "k", "pump-1", 2.0, (("flow", 1.0),), 0.0, 1.0, 1.0, "1")
    server.alert(event)  # ignored, never raises
    taken.close()


def test_node_ids_are_read_as_asyncua_writes_them_and_bad_ones_refused(tmp_path: Path) -> None:
    server = OpcServer(SENSORS, port=1)
    nodes = [{"sensor": SENSORS[0], "node_id": "ns=0;i=2258"},
             {"sensor": SENSORS[1], "node_id": "ns=02;s=Pump1.x"}]  # fmt: skip
    config = _config(tmp_path, {**_source(server), "nodes": nodes})
    routes = TopicRoutes(config.assets, SENSORS)
    (session,) = sessions(config.assets, routes, Decoder(routes, IngestLimits()), print)
    assert sorted(session.targets) == ["i=2258", "ns=2;s=Pump1.x"]
    bad = _config(tmp_path, {**_source(server), "nodes": [{"sensor": "flow", "node_id": "i=abc"}]})
    with pytest.raises(ConfigError, match="'i=abc' does not parse"):
        sessions(bad.assets, routes, Decoder(routes, IngestLimits()), print)
