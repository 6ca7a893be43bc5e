"""Model health per asset: the drift figures move when a sensor's distribution shifts, and
the fleet view ranks sites by them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.cli.health_cmds import drift_line, ranked
from edge_agent.drift import ScoreTrail
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config
from tests.support.sensordata import SENSORS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_drift_moves_when_a_sensor_shifts(tmp_path: Path) -> None:
    bundle, key = train_small(tmp_path / "model")
    site = Site(site_config(tmp_path, bundle), bundle, key.public_key(), tmp_path / "1")
    site.feed(pump(400, faulty=False, seed=1), 0)
    (calm,) = site.runtime.drift().values()
    assert calm.input_shift < 1.5 and calm.masked_fraction < 0.05, calm
    assert 0 < calm.score_median < 1 and calm.rows >= 400, calm
    shifted = pump(600, faulty=False, seed=2)
    runner = site.runtime.runners[0]
    assert runner.calibration is not None
    j = SENSORS.index("pressure")
    shifted[:, j] += 4 * float(runner.calibration.input_scale[j])  # 4 deviations up
    site.feed(shifted, 400)
    (moved,) = site.runtime.drift().values()
    site.stop()
    # Over the last rows kept (400 calm, 600 shifted): 0.6 x 4 deviations.
    assert moved.input_shift > 2.0 and moved.input_shift_sensor == "pressure", moved
    assert moved.score_median > calm.score_median
    health = site.runtime.health(0, rates_since_last=False)
    assert health.drift["pump-1"].input_shift == moved.input_shift


def test_the_score_trail_counts_raises_per_day() -> None:
    trail = ScoreTrail()
    for i in range(100):
        trail.add(0.2 + (i % 10) / 100, 1000.0 + 60 * i, raised=i in (10, 50))
    median, per_day = trail.summary()
    assert median == pytest.approx(0.245)
    assert per_day == pytest.approx(2 * 86_400 / (60 * 99))
    assert ScoreTrail().summary() == (0.0, 0.0)
    early = ScoreTrail()
    early.add(1.5, 0.0, raised=True)
    early.add(0.3, 10.0, raised=False)
    assert early.summary()[1] == 0.0  # 10 s of stream: no daily rate yet


def test_the_fleet_view_ranks_sites_by_drift() -> None:
    def device(name: str, version: str, shifts: dict[str, float]) -> operator_pb2.Device:
        d = operator_pb2.Device(name=name)
        d.status.model_version = version
        for asset, shift in shifts.items():
            d.status.health.drift[asset].CopyFrom(agent_pb2.AssetDrift(input_shift=shift))
        return d

    fleet = [device("a", "3", {"p1": 0.4}), device("b", "3", {"p1": 5.0, "p2": 1.0}),
             device("c", "2", {"p1": 9.0})]  # fmt: skip
    order = [(d.name, asset) for d, asset, _ in ranked(fleet, "3")]
    assert order == [("b", "p1"), ("b", "p2"), ("a", "p1")]
    assert ranked(fleet, "")[0][0].name == "c"
    assert "shift 5.0 sd" in drift_line("p1", fleet[1].status.health.drift["p1"])


def test_the_control_plane_exports_each_sites_drift(tmp_path: Path) -> None:
    """Through a real store: a site's drift, as its agent reported it, is on `/metrics`; a
    device whose reported health has the wrong shape costs only its own series."""
    import datetime as dt

    from prometheus_client import CollectorRegistry

    from cloud.domain import PresenceUpdate
    from cloud.service.metrics import FleetCollector
    from cloud.store import open_store

    now = dt.datetime.now(dt.UTC)
    store = open_store(f"sqlite:///{tmp_path / 'plane.db'}")
    try:
        health = {
            "edge-1": {
                "drift": {"pump-1": {"input_shift": 3.5, "score_median": 0.8}},
                "outbox_depth": "12",  # protobuf's JSON gives 64-bit integers as strings
            },
            "edge-2": {"drift": {"pump-2": "not a mapping", "pump-3": {"input_shift": None}}},
            "edge-3": {"drift": ["not", "a", "mapping"], "outbox_depth": 10**400},
        }
        for name, reported in health.items():
            device = store.create_device(name, {}, "", now)
            store.add_enrollment_token(device.id, name, now, now + dt.timedelta(hours=1))
            store.enroll(name, now, lambda d: "cert", lambda _c: ("1", "fp", now))
            store.record_presence(
                [PresenceUpdate(device.id, now, True, "0.1.0", {"health": reported})]
            )
        registry = CollectorRegistry()
        registry.register(FleetCollector(store, lambda: 3, lambda: True, dt.timedelta(seconds=30)))
        labels = {"device": "edge-1", "asset": "pump-1"}
        assert registry.get_sample_value("autoglm_device_drift_input_shift", labels) == 3.5
        assert registry.get_sample_value("autoglm_device_drift_score_median", labels) == 0.8
        assert registry.get_sample_value("autoglm_store_up") == 1.0
        assert registry.get_sample_value("autoglm_devices_online") == 3.0
        for name in ("edge-2", "edge-3"):  # their good series stay; the malformed ones go
            seen = registry.get_sample_value(
                "autoglm_device_last_seen_timestamp_seconds", {"device": name}
            )
            assert seen == now.timestamp(), name
        pump_3 = {"device": "edge-2", "asset": "pump-3"}
        assert registry.get_sample_value("autoglm_device_drift_input_shift", pump_3) is None
        assert registry.get_sample_value("autoglm_device_drift_score_median", pump_3) == 0.0
        depth = "autoglm_device_outbox_depth"
        assert registry.get_sample_value(depth, {"device": "edge-1"}) == 12.0
        assert registry.get_sample_value(depth, {"device": "edge-3"}) is None
    finally:
        store.close()
