"""What a hostile or broken publisher can make the decoder hold, log or spend: the topic
cache is bounded by its topics' text too (a topic may be 65,535 bytes), log lines show a
topic's first characters and its length, and an asset's messages past its rate are dropped
undecoded and counted."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest import decode as decode_module
from edge_agent.ingest.decode import Decoder, TopicRoutes
from edge_agent.ingest.rates import MessageRates

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


@pytest.mark.parametrize(
    ("junk", "chars"),
    [(8_200, 1_024), (66_000, 20)],  # past the cache's 8 MiB of text; past its 65,536 topics
    ids=["text", "entries"],
)
def test_a_full_topic_cache_starts_over_so_later_topics_are_cached_again(
    monkeypatch: pytest.MonkeyPatch, junk: int, chars: int
) -> None:
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
    limits = IngestLimits(max_messages_per_s=0)  # every message routed, none rate limited
    dec = Decoder(TopicRoutes(assets, ["flow"]), limits, clock=lambda: NOW)
    for i in range(junk):  # a flood of random topics on the asset's wildcard
        topic = f"plant/pump-1/{i:05d}"
        dec.decode(topic + "z" * (chars - len(topic)), READING)
    matched = [0]
    real = decode_module.topic_matches_sub

    def counting(pattern: str, topic: str) -> bool:
        matched[0] += 1
        return real(pattern, topic)

    monkeypatch.setattr(decode_module, "topic_matches_sub", counting)
    for _ in range(100):
        assert dec.decode("plant/pump-1/flow", READING) is not None
    # The first message is matched against the patterns, the other 99 found in the cache.
    assert matched[0] == 1, f"{matched[0]} pattern matches for 100 messages on one topic"


def test_a_long_topic_is_cut_short_in_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    dec = _decoder()
    topic = "plant/pump-1/" + "x" * 65_000
    with caplog.at_level(logging.WARNING, logger="edge_agent.ingest.decode"):
        dec.decode(topic, b"not json")
    (record,) = caplog.records
    line = record.getMessage()
    assert len(line) < 600, f"a log line of {len(line)} characters"
    assert "plant/pump-1/xxx" in line and f"({len(topic)} characters)" in line, line


def test_a_bucket_lets_a_burst_through_then_its_rate() -> None:
    rates = MessageRates(2, per_s=10.0, burst_s=2.0)  # 20 at once, then 10 a second
    assert sum(rates.admit(0, 100.0) for _ in range(50)) == 20
    assert sum(rates.admit(0, 101.0) for _ in range(50)) == 10  # a second later: 10 more
    assert sum(rates.admit(1, 101.0) for _ in range(50)) == 20  # each asset its own
    assert sum(rates.admit(0, 1_000.0) for _ in range(50)) == 20  # idle: a burst, no more


def test_messages_over_the_rate_are_counted_undecoded_and_logged_once_per_asset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assets = [
        AssetConfig(name="pump-1", topics=["plant/pump-1/+"]),
        AssetConfig(name="pump-2", topics=["plant/pump-2/+"]),
    ]
    limits = IngestLimits(max_messages_per_s=0.001, message_burst_s=1.0)  # one, then none
    dec = Decoder(TopicRoutes(assets, ["flow"]), limits, clock=lambda: NOW)
    with caplog.at_level(logging.WARNING, logger="edge_agent.ingest.decode"):
        for _ in range(1_000):
            dec.decode("plant/pump-1/flow", b"not even json")
        for _ in range(3):
            dec.decode("plant/pump-2/flow", READING)
    assert dec.drops == {"not_json": 1, "rate_limited": 999 + 2}, dec.drops
    assert dec.rate_limited == [999, 2]
    assert dec.accepted == 1
    lines = [r.getMessage() for r in caplog.records if "max_messages_per_s" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("asset pump-1 ") and "rate_limited, 1 so far" in lines[0]


def test_no_limit_when_the_rate_is_zero() -> None:
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
    limits = IngestLimits(max_messages_per_s=0)
    dec = Decoder(TopicRoutes(assets, ["flow"]), limits, clock=lambda: NOW)
    for _ in range(50_000):
        dec.decode("plant/pump-1/flow", READING)
    assert dec.accepted == 50_000 and not dec.drops


def test_the_rate_is_measured_on_the_injected_monotonic_clock() -> None:
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
    limits = IngestLimits(max_messages_per_s=10.0, message_burst_s=1.0)  # 10 at once, 10/s
    mono = [500.0]
    wall = [NOW]  # steps back an hour mid-way: the rate must not notice
    dec = Decoder(
        TopicRoutes(assets, ["flow"]), limits, clock=lambda: wall[0], monotonic=lambda: mono[0]
    )

    def admitted() -> int:
        before = dec.rate_limited[0]
        for _ in range(50):
            dec.decode("plant/pump-1/flow", READING)
        return 50 - (dec.rate_limited[0] - before)

    assert admitted() == 10  # the burst
    assert admitted() == 0  # no monotonic time passed: nothing more
    wall[0] = NOW - 3_600.0
    mono[0] += 0.5
    assert admitted() == 5  # half a second's worth, whatever the wall clock did
    mono[0] += 100.0
    assert admitted() == 10  # a long idle: a full burst again, no more


def test_a_rate_limit_raised_keeps_its_burst_in_proportion() -> None:
    """The runtime raises `ingest.max_messages_per_s` to what the model's assets send
    normally (RATE_HEADROOM x sensors / period): rate and burst scale together."""
    from edge_agent.ingest.rates import MessageRates

    rates = MessageRates(1, per_s=10.0, burst_s=2.0)
    rates.raise_to(5.0)  # never lowered
    assert (rates.per_s, rates.capacity) == (10.0, 20.0)
    rates.raise_to(100.0)
    assert (rates.per_s, rates.capacity) == (100.0, 200.0)
    assert sum(rates.admit(0, 0.0) for _ in range(300)) == 200
