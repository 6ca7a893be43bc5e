"""What a device or a client of the metrics port can make the control plane hold: the drift
series a device's reports name (bounded per device)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cloud.domain import PresenceUpdate
from cloud.service.metrics import MAX_DRIFT_ASSETS, FleetCollector
from cloud.store import open_store
from cloud.store.base import Store

pytestmark = pytest.mark.integration
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'plane.db'}")
    yield s
    s.close()


def _report(store: Store, name: str, health: dict[str, Any]) -> None:
    device = store.create_device(name, {}, "", NOW)
    store.add_enrollment_token(device.id, name, NOW, NOW + dt.timedelta(hours=1))
    store.enroll(name, NOW, lambda d: "cert", lambda _c: ("1", "fp", NOW))
    store.record_presence([PresenceUpdate(device.id, NOW, True, "0.1.0", {"health": health})])


def _assets(registry: CollectorRegistry, family: str, device: str) -> set[str]:
    return {
        s.labels["asset"]
        for m in registry.collect()
        if m.name == family
        for s in m.samples
        if s.labels["device"] == device
    }


def test_a_device_cannot_grow_the_scrape_with_the_asset_names_it_reports(store: Store) -> None:
    many = {f"asset-{i:04d}": {"input_shift": 1.0, "score_median": 0.5} for i in range(1000)}
    odd = {
        "x" * 5000: {"input_shift": 9.0},  # longer than any asset name
        'a"}\nfake_series 1': {"input_shift": 9.0},  # no asset is named so
    }
    _report(store, "flooder", {"drift": {**many, **odd}})
    _report(store, "honest", {"drift": {"pump-1": {"input_shift": 2.0, "score_median": 0.7}}})
    registry = CollectorRegistry()
    registry.register(FleetCollector(store, lambda: 0, lambda: True, dt.timedelta(seconds=30)))

    for family in ("autoglm_device_drift_input_shift", "autoglm_device_drift_score_median"):
        kept = _assets(registry, family, "flooder")
        # The first ones by name, so the same assets keep their series scrape after scrape.
        assert kept == {f"asset-{i:04d}" for i in range(MAX_DRIFT_ASSETS)}, (family, len(kept))
        assert _assets(registry, family, "honest") == {"pump-1"}, family
    omitted = "autoglm_device_drift_assets_omitted"
    assert registry.get_sample_value(omitted, {"device": "flooder"}) == 1002 - MAX_DRIFT_ASSETS
    assert registry.get_sample_value(omitted, {"device": "honest"}) is None  # nothing left out
    labels = {"device": "honest", "asset": "pump-1"}
    assert registry.get_sample_value("autoglm_device_drift_input_shift", labels) == 2.0
