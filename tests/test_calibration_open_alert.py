"""An alert open when the agent restarts without a calibration for the model it serves (a swap
to a new version, or its stored calibration lost) is not cleared by a calibration fitted on
the rows that follow: those may be the fault's. The asset does not calibrate while the alert
is open; the alert stays open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.runtime import OPEN_ALERT_CALIBRATION_WAIT_S
from tests.support.bundles import make_version
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("case", ["swap", "calibration lost"])
def test_an_open_alert_is_not_cleared_by_a_calibration_on_the_fault(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], case: str
) -> None:
    bundle, key = trained
    normal, fault = pump(300, faulty=False, seed=1), pump(900, faulty=True, seed=2)
    config = site_config(tmp_path, bundle)
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(np.concatenate([normal, fault[:300]]), 0)
    raised = [v.event for v in first.verdicts if v.event is not None]
    first.stop(graceful=True)
    assert [e.kind for e in raised] == ["raised"], raised

    served = bundle
    if case == "swap":
        served = make_version(trained, tmp_path / "v2", "2", key)
    else:
        for path in (config.state_dir / "calibration").rglob("*.json"):
            path.unlink()
    second = Site(site_config(tmp_path, served), served, key.public_key(), tmp_path / "2")
    second.feed(fault[300:], 600)  # the fault goes on
    events = [(v.event.kind, v.window_end) for v in second.verdicts if v.event is not None]
    still_open = second.runtime.kept_open("pump-1")
    calibrated = second.runtime.runners[0].calibration is not None
    second.stop(graceful=True)
    assert events == [], events
    assert still_open is not None and still_open.key == raised[0].key, still_open
    assert not calibrated, "calibrated on the fault's rows"
    # Nothing fitted on them was kept for the next start either.
    third = Site(site_config(tmp_path, served), served, key.public_key(), tmp_path / "3")
    try:
        assert third.runtime.runners[0].calibration is None
        assert third.runtime.kept_open("pump-1") is not None
    finally:
        third.stop()


def test_a_calibration_waits_for_an_open_alert_only_so_long(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    """Nothing on the agent closes an alert its asset cannot decide on: past
    OPEN_ALERT_CALIBRATION_WAIT_S the asset calibrates on what it sees, so it is scored again
    (an asset never scored again is worse than an alert cleared by a calibration)."""
    bundle, key = trained
    normal, fault = pump(300, faulty=False, seed=1), pump(900, faulty=True, seed=2)
    config = site_config(tmp_path, bundle)
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(np.concatenate([normal, fault[:300]]), 0)
    first.stop(graceful=True)
    for path in (config.state_dir / "calibration").rglob("*.json"):
        path.unlink()
    second = Site(site_config(tmp_path, bundle), bundle, key.public_key(), tmp_path / "2")
    now = [1000.0]
    second.runtime.clock = lambda: now[0]
    try:
        second.feed(fault[300:600], 600)
        assert second.runtime.runners[0].calibration is None, "calibrated at once"
        now[0] += OPEN_ALERT_CALIBRATION_WAIT_S + 1
        second.feed(fault[600:], 900)
        assert second.runtime.runners[0].calibration is not None, "never calibrated"
    finally:
        second.stop()
