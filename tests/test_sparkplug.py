"""Sparkplug B in and out.

The decoder against payloads built here (aliases, datatypes, sequence gaps, deaths, hostile
bytes); then a real agent data path on a real Mosquitto fed by an edge node made with a
third-party library (pysparkplug, in its own virtual environment): windows, a scored
prediction and an alert, a rebirth after a forced sequence gap, a death certificate, and
the alert read back as Sparkplug DDATA by that library's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import IngestLimits, load_agent_config
from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.ingest.decode import Decoder, TopicRoutes
from edge_agent.ingest.sparkplug import (
    BOOLEAN,
    DOUBLE,
    INT8,
    INT32,
    INT64,
    REBIRTH_METRIC,
    SparkplugDecoder,
    topics_for,
)
from edge_agent.simulate import Stream
from edge_agent.simulate_sparkplug import SimulatedNode, publish_node
from edge_agent.sparkplug_out import SparkplugAlerts
from protos.sparkplug import sparkplug_b_pb2 as spb
from tests.support.agents import wait_for
from tests.support.broker import Broker
from tests.support.bundles import train_small
from tests.support.datapath import pump
from tests.support.sensordata import SENSORS
from tests.support.site_agent import SiteAgent
from tests.support.sparkplug_peers import PEER_PYTHON, ROOT, start_host

NOW = 1_790_000_000.0
SOURCE = {"group": "plant", "edge_node": "gw-1", "device": "pump-1"}


def _config(tmp_path: Path, **extra: Any) -> Any:
    return load_agent_config(
        None,
        {
            "state_dir": tmp_path / "agent",
            "assets": [{"name": "pump-1", "sparkplug": SOURCE}],
            **extra,
        },
    )


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, spb.Payload]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        message = spb.Payload()
        message.ParseFromString(payload)
        self.messages.append((topic, message))


@pytest.fixture
def decoder(tmp_path: Path) -> tuple[SparkplugDecoder, Sent]:
    config = _config(tmp_path)
    routes = TopicRoutes(config.assets, SENSORS)
    sent = Sent()
    base = Decoder(routes, IngestLimits(), clock=lambda: NOW)
    return SparkplugDecoder(config.assets, routes, base, sent, clock=lambda: NOW), sent


def _payload(seq: int | None, *metrics: dict[str, Any], ts: float = NOW) -> bytes:
    message = spb.Payload(timestamp=int(ts * 1000))
    if seq is not None:
        message.seq = seq
    for m in metrics:
        message.metrics.add(**m)
    return message.SerializeToString()


def _birth(decoder: SparkplugDecoder, bd_seq: int = 3) -> None:
    node = _payload(0, {"name": "bdSeq", "datatype": INT64, "long_value": bd_seq})
    assert decoder.decode("spBv1.0/plant/NBIRTH/gw-1", node) is None
    device = _payload(
        1,
        *(
            {"name": s, "alias": i + 1, "datatype": DOUBLE, "double_value": 0.0}
            for i, s in enumerate(SENSORS)
        ),
    )
    # A birth defines the metrics; its values are snapshots, not readings.
    assert decoder.decode("spBv1.0/plant/DBIRTH/gw-1/pump-1", device) is None


def test_births_aliases_and_datatypes(decoder: tuple[SparkplugDecoder, Sent]) -> None:
    d, sent = decoder
    _birth(d)
    data = _payload(
        2,
        {"alias": 1, "double_value": 3.5, "timestamp": int((NOW - 1) * 1000)},
        {"name": SENSORS[1], "datatype": INT8, "int_value": 0xFE},  # -2 as two's complement
        {"alias": 3, "datatype": INT32, "int_value": 2**32 - 5},
        {"alias": 4, "datatype": BOOLEAN, "boolean_value": True},
    )
    chunks = d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", data)
    assert chunks is not None
    got = {c.sensor: (float(c.ts[0]), float(c.values[0])) for c in chunks}
    assert got == {0: (NOW - 1, 3.5), 1: (NOW, -2.0), 2: (NOW, -5.0), 3: (NOW, 1.0)}
    assert sent.messages == [] and d.base.accepted == 4


def test_gaps_unknown_aliases_and_unborn_nodes_ask_for_a_rebirth(
    decoder: tuple[SparkplugDecoder, Sent],
) -> None:
    d, sent = decoder
    data = _payload(5, {"alias": 1, "double_value": 1.0})
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", data) is None  # not born yet
    assert d.base.drops["not_born"] == 1 and len(sent.messages) == 1
    topic, command = sent.messages[0]
    assert topic == "spBv1.0/plant/NCMD/gw-1"
    assert [(m.name, m.boolean_value) for m in command.metrics] == [(REBIRTH_METRIC, True)]
    _birth(d)
    d.nodes[("plant", "gw-1")].rebirth_asked_at = -1e9  # past the rate limit
    # seq 5 after 1: a gap; the data itself is kept.
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", data) is not None
    assert d.base.drops["sequence_gap"] == 1 and len(sent.messages) == 2
    d.nodes[("plant", "gw-1")].rebirth_asked_at = -1e9
    unknown = _payload(6, {"alias": 99, "double_value": 1.0})
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", unknown) is None
    assert d.base.drops["unknown_alias"] == 1 and len(sent.messages) == 3
    # At most one request per node per REBIRTH_EVERY_S, whatever arrives.
    for seq in range(8, 40, 2):
        d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", _payload(seq, {"alias": 1, "double_value": 1}))
    assert len(sent.messages) == 3


def test_deaths_forget_births_and_a_stale_will_is_ignored(
    decoder: tuple[SparkplugDecoder, Sent],
) -> None:
    d, _ = decoder
    _birth(d, bd_seq=3)
    old_will = _payload(None, {"name": "bdSeq", "datatype": INT64, "long_value": 2})
    d.decode("spBv1.0/plant/NDEATH/gw-1", old_will)
    assert d.nodes[("plant", "gw-1")].born  # the will of an earlier session
    d.decode("spBv1.0/plant/DDEATH/gw-1/pump-1", _payload(2))
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", _payload(3, {"alias": 1,
                    "double_value": 1.0})) is None  # fmt: skip
    assert d.base.drops["not_born"] == 1
    _birth(d, bd_seq=3)
    d.decode("spBv1.0/plant/NDEATH/gw-1", _payload(None, {"name": "bdSeq", "long_value": 3}))
    assert not d.nodes[("plant", "gw-1")].born and d.deaths == 2


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("spBv1.0/plant/DDATA/gw-1/pump-1", b"\xff\xff\xff not protobuf", "not_sparkplug"),
        ("spBv1.0/plant/DDATA/gw-9/pump-1", b"", "unknown_topic"),
        ("spBv1.0/plant/BOGUS/gw-1/pump-1", b"", "unknown_topic"),
        ("spBv1.0/plant/DDATA/gw-1/pump-1/extra", b"", "unknown_topic"),
    ],
)
def test_hostile_messages_are_counted_not_raised(
    decoder: tuple[SparkplugDecoder, Sent], topic: str, payload: bytes, reason: str
) -> None:
    d, _ = decoder
    _birth(d)
    assert d.decode(topic, payload) is None
    assert d.base.drops[reason] == 1


def test_strings_nulls_and_unknown_sensors_are_dropped_by_reason(
    decoder: tuple[SparkplugDecoder, Sent],
) -> None:
    d, _ = decoder
    _birth(d)
    data = _payload(
        2,
        {"name": SENSORS[0], "string_value": "high"},
        {"name": SENSORS[1], "is_null": True},
        {"name": "not-a-sensor", "double_value": 1.0},
        {"name": SENSORS[2], "double_value": float("nan")},
        {"name": SENSORS[3], "double_value": 2.0, "timestamp": int((NOW + 3600) * 1000)},
    )
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", data) is None
    drops = {k: v for k, v in d.base.drops.items() if v}
    assert drops == {"bad_type": 1, "null_value": 1, "unknown_sensor": 1, "non_finite": 1,
                     "ts_future": 1}  # fmt: skip


def test_config_subscribes_to_the_nodes_and_refuses_bad_ids(tmp_path: Path) -> None:
    config = _config(tmp_path)
    # The node and all its devices: seq counts across them all.
    assert topics_for(config.assets) == ["spBv1.0/plant/+/gw-1", "spBv1.0/plant/+/gw-1/+"]
    with pytest.raises(Exception, match="edge_node"):
        _config(tmp_path, assets=[{"name": "p", "sparkplug": {**SOURCE, "edge_node": "a/b"}}])
    with pytest.raises(Exception, match="topics, sparkplug, modbus or opcua"):
        _config(tmp_path, assets=[{"name": "p"}])


def test_alert_metrics_are_born_then_sent_by_alias(tmp_path: Path) -> None:
    sent = Sent()
    mono = [0.0]
    out = SparkplugAlerts("plant", "autoglm-1", ["pump-1"], tmp_path, sent, clock=lambda: NOW,
                          monotonic=lambda: mono[0])  # fmt: skip
    again = SparkplugAlerts("plant", "autoglm-1", ["pump-1"], tmp_path, sent)
    assert (out.bd_seq, again.bd_seq) == (0, 1)  # one more per start
    out.birth()
    event = AlertEvent(RAISED, "k1", "pump-1", 1.7, (("flow", 0.8),), NOW - 24, NOW, NOW, "3")
    out.alert(event)
    topics = [t for t, _ in sent.messages]
    assert topics == ["spBv1.0/plant/NBIRTH/autoglm-1", "spBv1.0/plant/DBIRTH/autoglm-1/pump-1",
                      "spBv1.0/plant/DDATA/autoglm-1/pump-1"]  # fmt: skip
    assert [m.seq for _, m in sent.messages] == [0, 1, 2]
    data = sent.messages[2][1]
    assert [(m.alias, m.name) for m in data.metrics][:2] == [(1, "autoglm/fault"),
                                                              (2, "autoglm/score")]  # fmt: skip
    assert data.metrics[0].boolean_value and data.metrics[1].double_value == 1.7
    command = _payload(None, {"name": REBIRTH_METRIC, "datatype": BOOLEAN, "boolean_value": True})
    mono[0] = 10.0  # long after the birth: answered at once
    out.on_command(command)
    assert [t.split("/")[2] for t, _ in sent.messages[3:]] == ["NBIRTH", "DBIRTH"]
    assert sent.messages[4][1].metrics[0].boolean_value  # the rebirth carries the open alert


# ---- a real edge node of a third-party library, through Mosquitto ----
class Peer:
    """tests/peers/sparkplug_edge_node.py in .venv-sparkplug."""

    def __init__(self, broker: Broker, *extra: str) -> None:
        if not PEER_PYTHON.exists():
            raise RuntimeError(f"{PEER_PYTHON} is missing: run `make setup`")
        self.proc = subprocess.Popen(
            [str(PEER_PYTHON), str(ROOT / "tests" / "peers" / "sparkplug_edge_node.py"),
             "--port", str(broker.port), "--group", "plant", "--node", "gw-1",
             "--device", "pump-1", "--sensors", ",".join(SENSORS), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ},
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        assert self.read()["event"] == "born"

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the edge node exited ({self.proc.wait()})")
        doc: dict[str, Any] = json.loads(line)
        self.events.append(doc)
        return doc

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_third_party_edge_node_drives_the_agent_to_an_alert_read_back_over_sparkplug(
    tmp_path: Path, broker: Broker
) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = _config(
        tmp_path,
        mqtt={"host": "127.0.0.1", "port": broker.port},
        model={"bundle": bundle},
        decisions={"clear_at": 0.95},
        sparkplug_out={"group": "plant", "edge_node": "autoglm-1"},
    )
    agent = SiteAgent(tmp_path, config, bundle, key)
    runtime = agent.runtime
    peer: Peer | None = None
    reader, lines = start_host(broker.port, "autoglm-1")
    try:
        runtime.start()
        wait_for(lambda: runtime.mqtt.connected.is_set(), timeout=180)
        peer = Peer(broker)
        spb_in = runtime.sparkplug_in
        assert spb_in is not None
        wait_for(lambda: spb_in.births >= 2, timeout=30)  # NBIRTH and DBIRTH
        rows = np.vstack([pump(200, faulty=False, seed=1), pump(150, faulty=True, seed=2)])
        anchor = time.time() - rows.shape[0] - 5
        for a in range(0, rows.shape[0], 50):
            block = rows[a : a + 50]
            ts = [anchor + a + i for i in range(block.shape[0])]
            peer.send({"rows": block.tolist(), "ts": ts})
            expected = (a + block.shape[0]) * len(SENSORS)
            wait_for(lambda e=expected: runtime.decoder.accepted >= e, timeout=60)
        agent.first_alert(after=anchor + 200)
        # The alert, read back by the library's own client as DDATA of our device.
        line = lines.next(lambda doc: "metrics" in doc, timeout_s=30)
        assert line["topic"] == "spBv1.0/plant/DDATA/autoglm-1/pump-1", line
        assert line["metrics"]["autoglm/fault"] is True and line["metrics"]["autoglm/score"] > 1
        # A lost message: the agent asks for a rebirth and the node births again.
        assert peer.send({"gap": True})["event"] == "gap"
        first = peer.send({"rows": rows[:2].tolist(), "ts": [time.time() - 2, time.time() - 1]})
        # "sent" and the rebirth come from two threads of the node: in either order.
        assert {first["event"], peer.read()["event"]} == {"sent", "rebirth"}
        assert spb_in.rebirths_requested >= 1 and runtime.decoder.drops["sequence_gap"] == 1
        # Killed: the broker publishes its will, the agent marks the node dead.
        peer.kill()
        wait_for(lambda: not spb_in.nodes[("plant", "gw-1")].born, timeout=30)
        # The agent stops cleanly: to SCADA its node is dead, not stale (its NDEATH).
        agent.stop()
        death = lines.next(lambda doc: doc.get("death", False), timeout_s=30)
        assert death["topic"] == "spBv1.0/plant/NDEATH/autoglm-1", death
    finally:
        if peer is not None and peer.proc.poll() is None:
            peer.kill()
        reader.kill()
        agent.close()


def test_the_simulator_speaks_what_the_decoder_reads(
    decoder: tuple[SparkplugDecoder, Sent],
) -> None:
    d, sent = decoder
    stream = Stream(SENSORS, np.arange(6, dtype=np.float64), pump(6, faulty=False, seed=1))
    node = SimulatedNode("plant", "gw-1", [("pump-1", SENSORS)], clock=lambda: NOW)
    published: list[tuple[str, bytes]] = []
    count = publish_node(lambda t, p: published.append((t, p)), node, [("pump-1", stream)],
                         speed=0, batch=4, clock=lambda: NOW)  # fmt: skip
    assert count == len(published) == 4  # NBIRTH, DBIRTH, two DDATA (4 + 2 rows)
    chunks = [c for topic, payload in published for c in d.decode(topic, payload) or []]
    assert sum(c.ts.size for c in chunks) == 6 * len(SENSORS)
    assert d.base.drops.total() == 0 and sent.messages == []  # no gap, no rebirth asked
    assert node.death()[0] == "spBv1.0/plant/NDEATH/gw-1"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["NBIRTH", "NDATA", "DBIRTH", "DDATA", "NDEATH", "DDEATH", "NCMD"]),
    device=st.sampled_from(["", "pump-1", "pump-9", "a/b"]),
    payload=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda seq, alias, name, value: _payload(
                seq, {"alias": alias, "name": name, "double_value": value}
            ),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.text(max_size=20),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
    ),
)
def test_no_message_makes_the_decoder_raise(
    decoder: tuple[SparkplugDecoder, Sent], kind: str, device: str, payload: bytes
) -> None:
    d, _ = decoder
    topic = f"spBv1.0/plant/{kind}/gw-1" + (f"/{device}" if device else "")
    d.decode(topic, payload)  # counted or taken, never raised
    assert set(d.nodes) <= {("plant", "gw-1")}
    assert all(dev in ("", "pump-1") for node in d.nodes.values() for dev in node.aliases)


def test_names_that_are_not_text_and_shared_aliases_are_counted(
    decoder: tuple[SparkplugDecoder, Sent],
) -> None:
    d, _ = decoder
    _birth(d)
    raw = spb.Payload(seq=2).SerializeToString() + b"\x12\x03\x0a\x01\xff"  # name b"\xff"
    assert d.decode("spBv1.0/plant/DDATA/gw-1/pump-1", raw) is None
    assert d.base.drops["not_sparkplug"] == 1
    twice = _payload(3, {"name": SENSORS[0], "alias": 7, "datatype": DOUBLE},
                     {"name": SENSORS[1], "alias": 7, "datatype": DOUBLE})  # fmt: skip
    d.decode("spBv1.0/plant/DBIRTH/gw-1/pump-1", twice)
    assert d.base.drops["duplicate_alias"] == 1
    assert d.nodes[("plant", "gw-1")].aliases["pump-1"][7][0] == SENSORS[0]
    # Commands (ours too) are neither data nor state: no seq, no rebirth.
    d.decode("spBv1.0/plant/NCMD/gw-1", _payload(200, {"name": REBIRTH_METRIC,
             "boolean_value": True}))  # fmt: skip
    assert d.nodes[("plant", "gw-1")].seq == 3
