"""One sensor of an asset with a skewed clock (an hour ahead or behind) while the others are
right: it cannot move the asset's stream clock (also on two sensors, also when it sends most
of the messages), its readings are counted where they are dropped, and it is reported by
name and offset (health, log). A whole asset ahead is still followed."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest.clocks import (
    CLOCK_MIN_MESSAGES,
    SENSOR_FORGET_SPANS,
    SENSOR_LIVE_MIN_S,
    SensorClocks,
    middle,
)
from edge_agent.ingest.decode import Decoder, TopicRoutes
from edge_agent.outbox import Outbox
from edge_agent.runtime import EdgeRuntime
from edge_agent.serving import open_serving
from tests.support.bundles import train_small
from tests.support.datapath import site_config

pytestmark = pytest.mark.unit
NOW = 1_700_000_000.0
SENSORS = ("flow", "pressure", "current", "vibration")


class Clock:
    """The receiving clock, moved by the test."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def decoder(clock: Clock | None = None) -> Decoder:
    clock = clock or Clock()
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
    d = Decoder(TopicRoutes(assets, SENSORS), IngestLimits(), clock=clock)
    return d


def reading(d: Decoder, sensor: str, ts: float) -> bool:
    """Whether the reading was kept."""
    return d.decode(f"plant/pump-1/{sensor}", f'{{"ts": {ts}, "value": 1.0}}'.encode()) is not None


@pytest.mark.parametrize(
    ("sensors", "skewed_share"),
    [(SENSORS, 1), (("flow", "vibration"), 1), (SENSORS, 5)],
    ids=["one-of-four", "one-of-two", "the-chattiest-of-four"],
)
@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_a_sensor_with_a_skewed_clock_is_reported_and_cannot_move_its_asset(
    sensors: tuple[str, ...], skewed_share: int, skew: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "edge_agent.ingest.clocks")
    d = decoder()
    right_kept = skewed_kept = 0
    for i in range(60):
        for sensor in sensors:
            if sensor == "vibration":
                for k in range(skewed_share):  # messages at once: it may send the most
                    skewed_kept += reading(d, sensor, NOW + skew + i + k / skewed_share)
            else:
                right_kept += reading(d, sensor, NOW + i * 0.1)
        assert abs(d.clock_offset(0)) < 10, (i, d.clock_offset(0))  # never moved
    assert right_kept == 60 * (len(sensors) - 1)  # none of the right readings dropped
    assert d.sensor_clocks.skews == {"pump-1/vibration": pytest.approx(skew, abs=60)}
    assert "sensor vibration of pump-1 runs" in caplog.text, caplog.text
    assert f"runs {skew:+.0f}"[:7] in caplog.text  # e.g. "runs +3597 s"
    if skew > 0:  # judged by the asset's clock: too far ahead, dropped and counted
        assert skewed_kept == 0 and d.drops["ts_future"] == 60 * skewed_share
    # (behind: kept here, then `late` in the aligner, counted there)


def test_a_whole_asset_ahead_is_still_followed_and_no_sensor_stands_out() -> None:
    d = decoder()
    for i in range(40):
        for sensor in SENSORS:
            reading(d, sensor, NOW + 3600 + i)
    assert abs(d.clock_offset(0) - 3600) < 40
    assert d.sensor_clocks.skews == {}
    # Judged by the device's clock until the clocks had CLOCK_MIN_MESSAGES each.
    assert d.drops["ts_future"] <= CLOCK_MIN_MESSAGES * len(SENSORS)


def test_of_two_clocks_the_one_nearer_the_device_decides() -> None:
    assert middle([0.0, 3600.0]) == 0.0
    assert middle([-3600.0, 0.5]) == 0.5
    assert middle([0.0, 1.0, 3600.0]) == 1.0


def test_the_health_report_names_the_skewed_sensor(tmp_path: Path) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle)
    model = open_serving(bundle, key.public_key(), config.model, tmp_path / "m", tmp_path / "e")
    outbox = Outbox(config.state_dir / "outbox.sqlite3", 1 << 24)
    runtime = EdgeRuntime(config, model, outbox, "t")
    clock = runtime.decoder.clock
    try:
        for _ in range(20):
            for sensor in SENSORS:
                ts = clock() + (3600.0 if sensor == "vibration" else 0.0)  # type: ignore[operator]
                payload = f'{{"ts": {ts}, "value": 1.0}}'.encode()
                runtime.decoder.decode(f"plant/pump-1/{sensor}", payload)
        health = runtime.health(disk_free=0)
        assert dict(health.sensor_clock_offset_s) == {
            "pump-1/vibration": pytest.approx(3600, abs=60)
        }
        assert "pump-1" not in health.clock_offset_s  # the asset's clock is the device's
        assert health.dropped_by_reason["ts_future"] == 20
    finally:
        outbox.close()
        model.close()


def test_one_single_sensor_message_does_not_take_the_clock_from_a_multi_sensor_asset() -> None:
    assets = [AssetConfig(name="pump-1", topics=["plant/pump-1", "plant/pump-1/+"])]
    d = Decoder(TopicRoutes(assets, SENSORS), IngestLimits(), clock=lambda: NOW)

    def message(ts: float, sensors: tuple[str, ...]) -> bool:
        doc = {"ts": [ts], "values": {s: [1.0] for s in sensors}}
        return d.decode("plant/pump-1", orjson.dumps(doc)) is not None

    for i in range(40):  # the asset's clock an hour ahead: followed
        message(NOW + 3600 + i, SENSORS)
    assert abs(d.clock_offset(0) - 3600) < 60, d.clock_offset(0)
    assert message(NOW + 3641, ("flow",))  # one message of one sensor
    assert abs(d.clock_offset(0) - 3600) < 60, d.clock_offset(0)
    kept = sum(message(NOW + 3642 + i, SENSORS) for i in range(40))
    assert kept == 40, (kept, d.clock_offset(0), dict(d.drops))


def test_a_lone_sensor_left_of_its_asset_is_followed_like_the_asset() -> None:
    clock = Clock()
    d = decoder(clock)
    for _ in range(20):  # three sensors agree ...
        for sensor in ("flow", "pressure", "current"):
            reading(d, sensor, clock.now)
        clock.now += 0.1
    # ... two go silent, the survivor's clock steps an hour ahead: it is all the asset has,
    # once the others were not seen for SENSOR_LIVE_MIN_S (a few of their own intervals).
    kept = 0
    for _ in range(300):
        clock.now += 1.0
        kept += reading(d, "flow", clock.now + 3600)
    assert kept >= 300 - SENSOR_LIVE_MIN_S - CLOCK_MIN_MESSAGES, (kept, dict(d.drops))
    assert abs(d.clock_offset(0) - 3600) < 60, d.clock_offset(0)
    assert d.sensor_clocks.skews == {}


def test_sensors_not_seen_for_a_while_are_forgotten() -> None:
    clock = Clock()
    d = decoder(clock)
    for _ in range(20):
        for sensor in SENSORS:
            reading(d, sensor, clock.now)
        clock.now += 0.1
    forgotten_after = SENSOR_FORGET_SPANS * SENSOR_LIVE_MIN_S  # (their interval: 0.1 s)
    for _ in range(int(forgotten_after) + 2 * CLOCK_MIN_MESSAGES):  # (looked at every few)
        clock.now += 1.0
        reading(d, "flow", clock.now)
    assert list(d.sensor_clocks._clocks[0]) == [0], d.sensor_clocks._clocks[0]


@pytest.mark.parametrize("slow_s", [1, 5, 10, 30])
@pytest.mark.parametrize("skew", [3600.0, -3600.0], ids=["ahead", "behind"])
def test_a_fast_skewed_sensor_cannot_take_the_clock_from_slow_ones(
    slow_s: int, skew: float
) -> None:
    """Ten messages a second from the skewed sensor, one every `slow_s` from each of the
    three right ones: they stay live between their messages (by time, not by how many of
    the asset's last messages they sent), so the skewed one is outvoted throughout."""
    clock = Clock()
    d = decoder(clock)
    right_kept = right_sent = 0
    for tick in range(300 * 10):
        clock.now = NOW + tick / 10
        if tick % (10 * slow_s) == 0:
            for sensor in ("flow", "pressure", "current"):
                right_sent += 1
                right_kept += reading(d, sensor, clock.now)
        reading(d, "vibration", clock.now + skew)
        agreed = d.sensor_clocks.offset(0)
        assert agreed is not None and abs(d.clock_offset(0)) < 10, (
            f"{clock.now - NOW:.1f} s in: agreed {agreed}, asset clock {d.clock_offset(0):+.0f}"
        )
    assert right_kept == right_sent
    assert d.sensor_clocks.skews == {"pump-1/vibration": pytest.approx(skew, abs=60)}


def test_sensor_clocks_go_by_the_receiving_time_each_message_is_given() -> None:
    """`observe(..., now)`: the decoder's own clock, not `clock` (which is then not read)."""

    def unused() -> float:
        raise AssertionError("clock read although `now` was given")

    clocks = SensorClocks(["pump-1"], ["flow", "vibration"], clock=unused)
    for tick in range(600):  # vibration ten a second, an hour ahead; flow every 10 s
        if tick % 100 == 0:
            clocks.observe(0, 0, 0.0, NOW + tick / 10)
        clocks.observe(0, 1, 3600.0, NOW + tick / 10)
        assert clocks.offset(0) == 0.0, (tick, clocks.offset(0))
    clocks.observe(0, 1, 3600.0, NOW + 3600)  # flow silent an hour: vibration is alone
    assert clocks.offset(0) is None
    assert list(clocks._clocks[0]) == [1]  # ... and flow forgotten
