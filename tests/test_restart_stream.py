"""A graceful restart loses nothing of the stream: the readings in open slots, the window ring,
the decider's recent scores and the rows of a calibration in progress come back, so the
restarted agent scores exactly the windows, with exactly the scores, of one that never
stopped. A kill -9 keeps nothing of them, and a stale file never resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.bundles import train_small
from tests.support.datapath import Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _scores(site: Site) -> list[float]:
    return [round(v.score, 6) for v in site.verdicts]


def test_a_graceful_restart_scores_every_window_an_uninterrupted_run_scores(
    tmp_path: Path,
) -> None:
    bundle, key = train_small(tmp_path / "model")
    rows = np.concatenate([pump(300, faulty=False, seed=1), pump(200, faulty=True, seed=2)])

    whole = Site(site_config(tmp_path / "a", bundle), bundle, key.public_key(), tmp_path / "a")
    whole.feed(rows, 0)
    expected = _scores(whole)
    whole.stop()

    config = site_config(tmp_path / "b", bundle)
    cuts = (150, 330)  # one stop while calibrating, one while scoring the fault
    scores: list[float] = []
    start = 0
    for end in (*cuts, rows.shape[0]):
        site = Site(config, bundle, key.public_key(), tmp_path / f"b{end}")
        site.feed(rows[start:end], start)
        scores += _scores(site)
        site.stop(graceful=True)
        start = end
    assert len(scores) == len(expected) > 100
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_after_a_kill_nothing_stale_is_resumed(tmp_path: Path) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle)
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(pump(300, faulty=False, seed=1), 0)
    first.stop(graceful=True)
    kept = config.state_dir / "stream" / "pump-1.npz"
    assert kept.exists()
    second = Site(config, bundle, key.public_key(), tmp_path / "2")  # takes it back...
    assert not kept.exists()  # ...and removes it: a kill -9 now leaves nothing behind
    assert second.runtime.runners[0].filled > 0
    second.stop()
    third = Site(config, bundle, key.public_key(), tmp_path / "3")
    assert third.runtime.runners[0].filled == 0  # a fresh stream, not the first stop's
    third.stop()
