"""What a hostile or broken publisher can make the decoder hold or log: the topic cache is
bounded by its topics' text too (a topic may be 65,535 bytes), and log lines show a topic's
first characters and its length, not all of it."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest.decode import Decoder, TopicRoutes

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0
READING = b'{"ts": 1700000000, "value": 1}'


def _decoder() -> Decoder:
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
    return Decoder(TopicRoutes(assets, ["flow"]), IngestLimits(), clock=lambda: NOW)


def test_the_topic_cache_is_bounded_by_its_text_not_only_its_entries() -> None:
    dec = _decoder()
    tracemalloc.start()
    try:
        for i in range(200):  # 13 MB of topic text, 65,000 characters each
            dec.decode(f"plant/pump-1/{i:04d}" + "y" * 65_000, READING)
        for i in range(9_000):  # 9 MB more, 1,000 characters each
            dec.decode(f"plant/pump-1/{i:05d}" + "z" * 1_000, READING)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The cache keeps at most 8 MiB of topic text (22 MB here before it was bounded by it).
    assert held < 14e6, f"the decoder holds {held / 1e6:.1f} MB after 22 MB of topics"
    assert dec.drops["unknown_sensor"] == 9_200  # every one was still routed to its asset
    # Routes of topics it no longer keeps are still found, and the cached ones stay right.
    assert dec.decode("plant/pump-1/flow", READING) is not None
    assert dec.decode("plant/pump-1/flow", READING) is not None
    assert dec.decode("plant/pump-2/flow", READING) is None
    assert dec.drops["unknown_topic"] == 1


def test_a_long_topic_is_cut_short_in_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    dec = _decoder()
    topic = "plant/pump-1/" + "x" * 65_000
    with caplog.at_level(logging.WARNING, logger="edge_agent.ingest.decode"):
        dec.decode(topic, b"not json")
    (record,) = caplog.records
    line = record.getMessage()
    assert len(line) < 600, f"a log line of {len(line)} characters"
    assert "plant/pump-1/xxx" in line and f"({len(topic)} characters)" in line, line
