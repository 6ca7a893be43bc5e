"""Sparkplug B in: edge nodes whose devices the agent does not all map, and message kinds on
the wrong topic level. A node's `seq` is one counter across its own and all its devices'
messages, so the agent listens to every device of a configured node (through a real
Mosquitto here) and keeps no state for those it does not map."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import IngestLimits, load_agent_config
from edge_agent.ingest.decode import Decoded, Decoder, TopicRoutes
from edge_agent.ingest.mqtt import new_client
from edge_agent.ingest.sparkplug import DOUBLE, INT64, SparkplugDecoder
from protos.sparkplug import sparkplug_b_pb2 as spb
from tests.support.agents import wait_for
from tests.support.broker import Broker
from tests.support.sensordata import SENSORS

NOW = 1_790_000_000.0
SOURCE = {"group": "plant", "edge_node": "gw-1", "device": "pump-1"}


def _config(tmp_path: Path, **extra: Any) -> Any:
    assets = [{"name": "pump-1", "sparkplug": SOURCE}]
    return load_agent_config(None, {"state_dir": tmp_path / "agent", "assets": assets, **extra})


class Node:
    """An edge node's messages, numbered by one `seq` across the node and its devices."""

    def __init__(self, clock: Any = lambda: NOW) -> None:
        self.seq = 0
        self.clock = clock

    def message(self, kind: str, device: str, *metrics: dict[str, Any]) -> tuple[str, bytes]:
        payload = spb.Payload(timestamp=int(self.clock() * 1000), seq=self.seq % 256)
        self.seq += 1
        for m in metrics:
            payload.metrics.add(**m)
        topic = f"spBv1.0/plant/{kind}/gw-1" + (f"/{device}" if device else "")
        return topic, payload.SerializeToString()

    def births(self, devices: list[str]) -> list[tuple[str, bytes]]:
        out = [self.message("NBIRTH", "", {"name": "bdSeq", "datatype": INT64, "long_value": 1})]
        for device in devices:
            out.append(self.message("DBIRTH", device, *(
                {"name": s, "alias": i + 1, "datatype": DOUBLE, "double_value": 0.0}
                for i, s in enumerate(SENSORS)
            )))  # fmt: skip
        return out


@pytest.fixture
def decoder(tmp_path: Path) -> tuple[SparkplugDecoder, list[str]]:
    config = _config(tmp_path)
    routes = TopicRoutes(config.assets, SENSORS)
    asked: list[str] = []
    base = Decoder(routes, IngestLimits(), clock=lambda: NOW)
    d = SparkplugDecoder(config.assets, routes, base, lambda t, _: asked.append(t),
                         clock=lambda: NOW)  # fmt: skip
    return d, asked


def test_unmapped_devices_count_for_seq_and_leave_no_state(
    decoder: tuple[SparkplugDecoder, list[str]],
) -> None:
    d, asked = decoder
    node = Node()
    others = [f"pump-{i}" for i in range(2, 502)]  # many devices no asset maps
    for topic, payload in node.births(["pump-1", *others]):
        assert d.decode(topic, payload) is None
    readings = 0
    for i in range(20):
        for device in ["pump-1", others[i], others[-1 - i]]:
            topic, payload = node.message("DDATA", device, {"alias": 1, "double_value": 1.0})
            readings += sum(c.ts.size for c in d.decode(topic, payload) or [])
        topic, payload = node.message("DDEATH", others[i])
        assert d.decode(topic, payload) is None
    drops = {k: v for k, v in d.base.drops.items() if v}
    assert (readings, drops, asked) == (20, {}, []), "a gap on another device's messages"
    state = d.nodes[("plant", "gw-1")]
    assert state.seq == (node.seq - 1) % 256
    assert set(state.aliases) == set(state.types) == {"", "pump-1"} and state.devices == {
        "pump-1"
    }, "state kept for devices no asset maps"
    assert d.births == 2  # the node's and pump-1's; the others' are not learnt


def test_a_flooding_device_is_rate_limited_after_its_seq_is_checked(tmp_path: Path) -> None:
    config = _config(tmp_path)
    routes = TopicRoutes(config.assets, SENSORS)
    asked: list[str] = []
    limits = IngestLimits(max_messages_per_s=10, message_burst_s=2)
    mono = [100.0]
    base = Decoder(routes, limits, clock=lambda: NOW, monotonic=lambda: mono[0])
    d = SparkplugDecoder(config.assets, routes, base, lambda t, _: asked.append(t),
                         clock=lambda: NOW)  # fmt: skip
    node = Node()
    for topic, payload in node.births(["pump-1"]):
        assert d.decode(topic, payload) is None
    kept = 0
    for _ in range(500):  # all at one instant: a burst of 20 messages, then nothing
        topic, payload = node.message("DDATA", "pump-1", {"alias": 1, "double_value": 1.0})
        kept += len(d.decode(topic, payload) or [])
    assert (kept, base.rate_limited[0], base.drops["rate_limited"]) == (20, 480, 480)
    mono[0] += 1.0  # ten more a second later; the seq was followed throughout: no gap
    for _ in range(15):
        topic, payload = node.message("DDATA", "pump-1", {"alias": 1, "double_value": 1.0})
        kept += len(d.decode(topic, payload) or [])
    assert kept == 30 and base.drops["sequence_gap"] == 0 and asked == [], base.drops


@pytest.mark.integration
def test_a_node_with_devices_the_agent_does_not_map_over_mosquitto(
    tmp_path: Path, broker: Broker
) -> None:
    from edge_agent.sources import Sources

    config = _config(tmp_path, mqtt={"host": "127.0.0.1", "port": broker.port})
    routes = TopicRoutes(config.assets, SENSORS)
    base = Decoder(routes, config.ingest)
    got: list[Decoded] = []
    sources = Sources(config, config.assets, "agent-1", routes, base, got.append, [])
    spb_in = sources.sparkplug_in
    assert spb_in is not None
    node_client = new_client()
    node_client.connect("127.0.0.1", broker.port)
    node_client.loop_start()
    sources.start()
    try:

        def send(message: tuple[str, bytes]) -> None:
            node_client.publish(*message, qos=1).wait_for_publish(10)

        wait_for(sources.mqtt.connected.is_set, timeout=180)
        # Subscribed once a command to the node (neither data nor state) comes through.
        wait_for(lambda: send(("spBv1.0/plant/NCMD/gw-1", b"")) or sources.mqtt.stats.messages,
                 timeout=30, interval=0.2)  # fmt: skip
        node = Node(clock=time.time)
        others = [f"pump-{i}" for i in range(2, 12)]
        for message in node.births(["pump-1", *others]):
            send(message)
        rounds = 12
        for i in range(rounds):
            for device in ["pump-1", *others]:
                send(node.message("DDATA", device, {"alias": 1, "double_value": 1.0 + i}))
        last = (node.seq - 1) % 256

        def seq() -> int | None:
            state = spb_in.nodes.get(("plant", "gw-1"))
            return None if state is None else state.seq

        def readings() -> int:
            return sum(c.ts.size for batch in got if isinstance(batch, list) for c in batch)

        # Every message of the node reaches the decoder: its seq is the node's last.
        wait_for(lambda: (seq() == last and readings() == rounds) or base.drops.total() > 0,
                 timeout=30)  # fmt: skip
        drops = {k: v for k, v in base.drops.items() if v}
        assert (readings(), drops, spb_in.rebirths_requested) == (rounds, {}, 0), seq()
        assert spb_in.nodes[("plant", "gw-1")].devices == {"pump-1"}
    finally:
        sources.stop()
        node_client.loop_stop()
        node_client.disconnect()


@pytest.mark.parametrize(
    "topic",
    [
        "spBv1.0/plant/NBIRTH/gw-1/pump-1",  # would reset the whole node
        "spBv1.0/plant/NDEATH/gw-1/pump-1",  # would kill it
        "spBv1.0/plant/NDATA/gw-1/pump-1",
        "spBv1.0/plant/DBIRTH/gw-1",  # would replace the node's own aliases
        "spBv1.0/plant/DDEATH/gw-1",  # would forget them
        "spBv1.0/plant/DDATA/gw-1",
        "spBv1.0/plant/DBIRTH/gw-1/",  # a device with no id
    ],
)
def test_a_kind_on_the_wrong_topic_level_is_refused_and_changes_nothing(
    decoder: tuple[SparkplugDecoder, list[str]], topic: str
) -> None:
    d, asked = decoder
    node = Node()
    level = {"name": "level", "alias": 50, "datatype": DOUBLE, "double_value": 0.0}
    d.decode(*node.message("NBIRTH", "", level))
    d.decode(*node.message("DBIRTH", "pump-1", {**level, "name": SENSORS[0], "alias": 1}))
    state = d.nodes[("plant", "gw-1")]
    before = (state.born, state.bd_seq, state.seq, dict(state.aliases), set(state.devices))
    _, payload = node.message("NBIRTH", "", {"name": "bdSeq", "datatype": INT64, "long_value": 9},
                              {"name": "x", "alias": 1, "datatype": DOUBLE})  # fmt: skip
    assert d.decode(topic, payload) is None
    assert {k: v for k, v in d.base.drops.items() if v} == {"unknown_topic": 1}
    after = (state.born, state.bd_seq, state.seq, dict(state.aliases), set(state.devices))
    assert after == before and state is d.nodes[("plant", "gw-1")] and asked == []
    assert state.aliases[""][50][0] == "level"  # the node-level alias outlives it
