"""When an asset's stream restarts at a clock step (`AssetRunner.follow_clock`): once its
whole clock stepped back (its stream clock went back, or nothing was added for a window of
this device's time while late readings kept coming), never because one sensor, however fast,
runs behind the others; and the restarts are said at once, then every STEP_LOG_S.

Real decoder and aligner, messages one per drain as independent publishers send them; the
device's clocks (the decoder's wall clock, the runner's monotonic one) are simulated."""

from __future__ import annotations

import logging
import types
from typing import Any

import numpy as np
import orjson
import pytest

from edge_agent.asset_stream import STEP_LOG_S, AssetRunner
from edge_agent.batching import WindowBatch
from edge_agent.config import AssetConfig, IngestLimits
from edge_agent.ingest.decode import Decoded, Decoder, TopicRoutes
from edge_agent.windowing import WindowSpec

pytestmark = pytest.mark.unit
SENSORS = ("flow", "pressure", "temp", "vib")
START = 1_700_000_000.0
SPEC = WindowSpec(length=24, stride=2, period_s=1.0, max_staleness_s=3.0)


class Asset:
    """pump-1 through a real Decoder and AssetRunner (calibrated: every window is cut)."""

    def __init__(self) -> None:
        n = len(SENSORS)
        self.wall = START  # this device's clock (time.time)
        self.mono = 0.0  # ... and its monotonic clock, which never steps
        assets = [AssetConfig(name="pump-1", topics=["plant/pump-1/+"])]
        self.decoder = Decoder(TopicRoutes(assets, SENSORS), IngestLimits(), clock=self.now)
        model: Any = types.SimpleNamespace(
            spec=SPEC,
            schema=types.SimpleNamespace(size=n),
            manifest=types.SimpleNamespace(calibration_rows=120),
            frame=types.SimpleNamespace(
                net_center=np.zeros(n, np.float32), net_scale=np.ones(n, np.float32)
            ),
        )
        self.runner = AssetRunner(0, "pump-1", model, lateness_s=2.0, history_rows=0)
        self.runner.clock = lambda: self.mono  # set, not passed: the old runner took none
        self.runner.calibration = types.SimpleNamespace(  # type: ignore[assignment]
            input_center=np.zeros(n, np.float32), input_scale=np.ones(n, np.float32)
        )
        self.windows = 0

    def now(self) -> float:
        return self.wall

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def send(self, sensor: str, ts: float) -> None:
        """One message of one sensor, then the pipeline's drain."""
        item = self.decoder.decode(f"plant/pump-1/{sensor}", orjson.dumps({"ts": ts, "value": 1.0}))
        self.drain(item)

    def send_all(self, ts: float) -> None:
        """One message with every sensor's reading (the asset's own clock decides)."""
        doc = [{"sensor": s, "ts": ts, "value": 1.0} for s in SENSORS]
        self.drain(self.decoder.decode("plant/pump-1/all", orjson.dumps(doc)))

    def drain(self, item: Decoded | None) -> None:
        runner = self.runner
        if item is not None:
            if isinstance(item, tuple):
                runner.aligner.add(item[1], item[2], item[3])
            else:
                for chunk in item:
                    runner.aligner.add_many(chunk.sensor, chunk.ts, chunk.values)
        runner.follow_clock(self.decoder.clock_offset(0))
        cap = self.wall + max(0.0, self.decoder.clock_offset(0))
        while (rows := runner.aligner.close_ready(cap)) is not None:
            runner.feed(rows, self.emitted, lambda *_: None)

    def emitted(self, batch: WindowBatch) -> None:
        self.windows += len(batch)

    @property
    def late(self) -> int:
        return self.runner.aligner.counts["late"] + self.runner.carried["late"]


@pytest.mark.parametrize("rate", [10, 40])
def test_a_fast_sensor_whose_clock_runs_behind_never_restarts_its_asset(rate: int) -> None:
    asset = Asset()
    seconds = 120
    for tick in range(seconds * rate):
        if tick % rate == 0:
            for sensor in SENSORS[:3]:
                asset.send(sensor, asset.wall)
        asset.send("vib", asset.wall - 600.0)  # 10 min behind, 10 or 40 messages a second
        asset.tick(1.0 / rate)
    runner = asset.runner
    # Before: 8 of its messages in a row between the others' restarted the stream, every
    # second (120 restarts, 0 windows).
    assert runner.clock_steps == 0, (runner.clock_steps, asset.windows)
    healthy = (seconds - SPEC.length) // SPEC.stride
    assert asset.windows >= healthy - 2, (asset.windows, healthy)
    assert asset.late >= seconds * rate - 2 * 8, asset.late  # its readings: late, counted


@pytest.mark.parametrize("together", [False, True], ids=["own-topics", "one-message"])
def test_the_whole_asset_stepping_back_restarts_its_stream_once_and_scoring_goes_on(
    together: bool,
) -> None:
    asset = Asset()
    for phase, skew in ((0, 0.0), (1, -3600.0)):  # a gateway rebooted an hour back
        before = asset.windows
        for _ in range(200):
            if together:
                asset.send_all(asset.wall + skew)
            else:
                for sensor in SENSORS:
                    asset.send(sensor, asset.wall + skew)
            asset.tick(1.0)
        assert asset.windows - before > 70, (phase, asset.windows - before)
    runner = asset.runner
    assert runner.clock_steps == 1, runner.clock_steps
    # Its stream clock follows the step after about half its median's messages: those
    # readings are lost as late, not an hour of them.
    late_rows = asset.late // len(SENSORS)
    assert late_rows <= 40, late_rows


def test_a_stream_stamped_by_this_device_restarts_after_a_window_when_its_clock_steps_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The device's wall clock steps back (NTP) and its readings are stamped by it: the stream
    clock moves nothing (readings and device step together), the monotonic clock goes on."""
    caplog.set_level(logging.WARNING, "edge_agent.asset_stream")
    asset = Asset()
    for phase in range(2):
        before = asset.windows
        for _ in range(200):
            for sensor in SENSORS:
                asset.send(sensor, asset.wall)
            asset.tick(1.0)
        assert asset.windows - before > 70, (phase, asset.windows - before)
        if phase == 0:
            asset.wall -= 3600.0
    runner = asset.runner
    assert runner.clock_steps == 1, runner.clock_steps
    late_rows = asset.late // len(SENSORS)
    window_s = SPEC.length * SPEC.period_s
    assert window_s <= late_rows <= window_s + 2, late_rows  # a window of this device's time
    assert "none of its sensors added a reading for 2" in caplog.text, caplog.text


def test_restarts_are_said_at_once_then_once_per_step_log_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway whose clock steps back an hour every 2 minutes for an hour: each step
    restarts the stream, one line per STEP_LOG_S says them (with the count)."""
    caplog.set_level(logging.WARNING, "edge_agent.asset_stream")
    asset = Asset()
    skew, steps = 0.0, 30
    for _ in range(steps + 1):
        for _ in range(120):
            asset.send_all(asset.wall + skew)
            asset.tick(1.0)
        skew -= 3600.0
    runner = asset.runner
    assert runner.clock_steps == steps, runner.clock_steps
    lines = [r.getMessage() for r in caplog.records if "its clock stepped back" in r.getMessage()]
    span = steps * 120.0
    assert len(lines) <= 1 + span // STEP_LOG_S, (len(lines), lines)  # before: one a step
    assert "restart(s) since the last such line" in lines[-1], lines[-1]
