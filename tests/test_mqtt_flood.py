"""One asset flooding the agent's MQTT connection (real Mosquitto, the agent's MqttConnection
and Decoder): past its message rate its messages are dropped undecoded and counted
(`rate_limited`), and another asset's readings all arrive.

Mosquitto may drop QoS 0 messages under load, so the test never waits for all of the flood:
it counts what reached the decoder and ends on a QoS 1 marker per asset, published after the
flood; every message that arrived is either delivered or counted as rate limited."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import orjson
import pytest

from edge_agent.config import AssetConfig, IngestLimits, MqttLink
from edge_agent.ingest.decode import Decoded, Decoder, TopicRoutes
from edge_agent.ingest.mqtt import MqttConnection, new_client
from tests.support.agents import wait_for
from tests.support.broker import Broker

pytestmark = [pytest.mark.integration]

FLOOD = 20_000  # QoS 0 messages to asset A, as fast as the publisher goes
VICTIM = 50  # QoS 1 readings of asset B, one after every 400 of A's
PER_S, BURST_S = 100.0, 1.0


def test_a_flooding_asset_is_rate_limited_and_the_others_readings_arrive(broker: Broker) -> None:
    prefix = f"flood-{uuid.uuid4().hex[:6]}"
    assets = [
        AssetConfig(name="A", topics=[f"{prefix}/A/+"]),
        AssetConfig(name="B", topics=[f"{prefix}/B/+"]),
    ]
    limits = IngestLimits(max_messages_per_s=PER_S, message_burst_s=BURST_S)
    decoder = Decoder(TopicRoutes(assets, ["flow"]), limits)
    arrived: Counter[str] = Counter()  # readings' messages that reached the decoder, by asset
    probed = threading.Event()
    ended = {"A": threading.Event(), "B": threading.Event()}
    delivered: Counter[int] = Counter()

    def decode(topic: str, payload: bytes) -> Decoded | None:
        asset, sensor = topic.split("/")[-2:]
        if sensor == "probe":  # the test's own markers, kept from the decoder and its rates
            probed.set()
            return None
        if sensor == "end":
            ended[asset].set()
            return None
        arrived[asset] += 1
        return decoder.decode(topic, payload)

    def deliver(decoded: Decoded) -> None:
        assert isinstance(decoded, tuple)
        delivered[decoded[0]] += 1

    link = MqttLink(host="127.0.0.1", port=broker.port, session_expiry_s=0)
    topics = [t for a in assets for t in a.topics]
    conn = MqttConnection(link, f"{prefix}-agent", topics, decode, deliver)
    conn.start()
    publisher = new_client()
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        assert conn.connected.wait(30)
        wait_for(lambda: publisher.is_connected(), timeout=30)
        # The agent's subscriptions are in place once a probe comes through them (one sent
        # before they were is lost: send again).
        deadline = time.monotonic() + 60
        while not probed.wait(0.5):
            assert time.monotonic() < deadline, "no probe reached the agent in 60 s"
            publisher.publish(f"{prefix}/B/probe", b"", qos=1)
        began = time.monotonic()
        flood = orjson.dumps({"ts": time.time(), "value": 1.0})
        for i in range(FLOOD):
            publisher.publish(f"{prefix}/A/flow", flood, qos=0)
            if i % (FLOOD // VICTIM) == 0:
                reading = orjson.dumps({"ts": time.time(), "value": 2.0})
                publisher.publish(f"{prefix}/B/flow", reading, qos=1)
        for name in ended:  # after everything above on the publisher's one connection
            publisher.publish(f"{prefix}/{name}/end", b"", qos=1)
        for name, event in ended.items():
            assert event.wait(180), f"{name}'s end marker did not arrive; arrived {arrived}"
        elapsed = time.monotonic() - began
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        conn.stop()
    seen = f"arrived {dict(arrived)}, delivered {dict(delivered)}, drops {dict(decoder.drops)}"
    seen += f", in {elapsed:.1f} s"
    # A: every message that arrived was delivered or counted undecoded; no more delivered
    # than its burst and its rate over the flood's duration.
    assert delivered[0] + decoder.rate_limited[0] == arrived["A"], seen
    assert decoder.drops["rate_limited"] == decoder.rate_limited[0], seen
    most = PER_S * BURST_S + PER_S * elapsed
    assert delivered[0] <= most, seen
    assert decoder.rate_limited[0] >= arrived["A"] - most, seen
    # B: every reading (QoS 1), none limited.
    assert arrived["B"] == delivered[1] == VICTIM, seen
    assert decoder.rate_limited[1] == 0, seen
