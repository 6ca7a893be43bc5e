"""One asset flooding the agent's MQTT connection (real Mosquitto, the agent's MqttConnection
and Decoder): past its message rate its messages are dropped undecoded and counted
(`rate_limited`), and another asset's readings all arrive."""

from __future__ import annotations

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
    delivered: Counter[int] = Counter()

    def deliver(decoded: Decoded) -> None:
        assert isinstance(decoded, tuple)
        delivered[decoded[0]] += 1

    link = MqttLink(host="127.0.0.1", port=broker.port, session_expiry_s=0)
    topics = [t for a in assets for t in a.topics]
    conn = MqttConnection(link, f"{prefix}-agent", topics, decoder.decode, deliver)
    conn.start()
    publisher = new_client()
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        assert conn.connected.wait(10)
        wait_for(lambda: publisher.is_connected())
        time.sleep(0.3)  # the agent's subscriptions are in place
        began = time.monotonic()
        flood = orjson.dumps({"ts": time.time(), "value": 1.0})
        for i in range(FLOOD):
            publisher.publish(f"{prefix}/A/flow", flood, qos=0)
            if i % (FLOOD // VICTIM) == 0:
                reading = orjson.dumps({"ts": time.time(), "value": 2.0})
                publisher.publish(f"{prefix}/B/flow", reading, qos=1)
        wait_for(lambda: conn.stats.messages >= FLOOD + VICTIM, timeout=120)
        elapsed = time.monotonic() - began
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        conn.stop()
    # A: its burst and its rate over the flood's duration, the rest counted undecoded.
    most = PER_S * BURST_S + PER_S * elapsed
    assert delivered[0] <= most, f"A: {delivered[0]} readings in {elapsed:.1f} s"
    assert decoder.drops["rate_limited"] == decoder.rate_limited[0] == FLOOD - delivered[0], (
        decoder.drops,
        delivered,
    )
    # B: every reading, none limited.
    assert delivered[1] == VICTIM, (delivered, decoder.drops, f"{elapsed:.1f} s")
    assert decoder.rate_limited[1] == 0
