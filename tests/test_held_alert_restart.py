"""A raise held back by maintenance stays off SCADA (Sparkplug, OPC UA) after a restart while
the period still covers it, also when the restarted agent has no calibration for the model it
serves (swapped, or its stored calibration lost)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos.autoglm.v1 import agent_pb2
from tests.support.bundles import make_version
from tests.support.datapath import START, Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _out_of_service(asset: str) -> agent_pb2.Maintenance:
    message = agent_pb2.Maintenance()
    period = message.periods.add(id="seals", asset=asset, reason="seals")
    period.starts_at.FromNanoseconds(int(START * 1e9))
    return message


@pytest.mark.parametrize("case", ["same model", "swap", "calibration lost"])
def test_a_held_raise_is_not_restored_to_scada_while_maintenance_covers_it(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], case: str
) -> None:
    bundle, key = trained
    rows = np.concatenate([pump(300, faulty=False, seed=1), pump(300, faulty=True, seed=2)])
    config = site_config(tmp_path, bundle)
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.runtime.maintenance.replace(_out_of_service("pump-1"))
    first.feed(rows, 0)
    raised = [v.event for v in first.verdicts if v.event is not None]
    held = first.runtime.open_alerts.is_held("pump-1")
    first.stop(graceful=True)
    assert [e.kind for e in raised] == ["raised"] and held, (raised, held)

    served = bundle
    if case == "swap":
        served = make_version(trained, tmp_path / "v2", "2", key)
    elif case == "calibration lost":
        for path in (config.state_dir / "calibration").rglob("*.json"):
            path.unlink()
    second = Site(site_config(tmp_path, served), served, key.public_key(), tmp_path / "2")
    try:
        assert second.runtime.kept_open("pump-1") is not None
        restored = [e.key for e in second.runtime.sources._published]
        assert restored == [], f"held raise restored to SCADA: {restored}"
    finally:
        second.stop()
