"""A graceful restart loses nothing of the stream: the readings in open slots, the window ring,
the decider's recent scores and the rows of a calibration in progress come back, so the
restarted agent scores exactly the windows, with exactly the scores, of one that never
stopped. A kill -9 resumes from the last checkpoint (kept until the next replaces it), and a
stale file never resumes."""

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


@pytest.mark.parametrize("checkpoint_s", [5.0, 0.0])
def test_after_a_kill_nothing_stale_is_resumed(tmp_path: Path, checkpoint_s: float) -> None:
    bundle, key = train_small(tmp_path / "model")
    config = site_config(tmp_path, bundle, ingest={"checkpoint_s": checkpoint_s})
    first = Site(config, bundle, key.public_key(), tmp_path / "1")
    first.feed(pump(300, faulty=False, seed=1), 0)
    first.stop(graceful=True)
    kept = config.state_dir / "stream" / "pump-1.npz"
    assert kept.exists()
    second = Site(config, bundle, key.public_key(), tmp_path / "2")  # takes it back...
    assert second.runtime.runners[0].filled > 0
    # ... and, with checkpoints, leaves it for the first to replace: killed before that (a
    # crash loop), the next start resumes it again. Without, a kill leaves nothing stale.
    assert kept.exists() == bool(checkpoint_s)
    second.stop()
    third = Site(config, bundle, key.public_key(), tmp_path / "3")
    filled = third.runtime.runners[0].filled
    assert (filled > 0) == bool(checkpoint_s), filled
    third.stop()


def _ends(site: Site) -> list[float]:
    return [v.window_end for v in site.verdicts]


@pytest.mark.parametrize("checkpoint_s", [0.01, 0.0])
def test_after_a_kill_no_window_is_scored_twice_and_those_never_scored_are_counted(
    tmp_path: Path, checkpoint_s: float
) -> None:
    """Killed 10 rows after the stream was last kept (those readings acknowledged and gone),
    restarted on the readings after them: the restarted agent resumes from the checkpoint,
    skips the windows the killed one had kept and counts exactly those nobody scored. With
    no checkpoint (0) the stream starts afresh: more are lost, and still counted."""
    bundle, key = train_small(tmp_path / "model")
    rows = pump(500, faulty=False, seed=1)
    whole = Site(site_config(tmp_path / "a", bundle), bundle, key.public_key(), tmp_path / "a")
    whole.feed(rows, 0)
    every_end = set(_ends(whole))
    whole.stop()

    config = site_config(tmp_path / "b", bundle, ingest={"checkpoint_s": checkpoint_s})
    killed = Site(config, bundle, key.public_key(), tmp_path / "b1")
    killed.feed(rows[:300], 0)
    # checkpoint_s later by the runtime's clock (no sleep): the pipeline thread would keep
    # the stream now.
    now = killed.runtime.clock() + 2 * checkpoint_s
    killed.runtime.clock = lambda: now
    killed.runtime.checkpoint_streams()
    if checkpoint_s:
        assert (config.state_dir / "stream" / "pump-1.npz").exists(), "no checkpoint kept"
    killed.feed(rows[300:310], 300)
    before = _ends(killed)
    killed.stop()  # as a kill -9 leaves it

    restarted = Site(config, bundle, key.public_key(), tmp_path / "b2")
    assert restarted.runtime.unclean
    resumed_rows = restarted.runtime.runners[0].filled
    restarted.feed(rows[310:], 310)
    after = _ends(restarted)
    restarted.stop(graceful=True)

    assert not set(before) & set(after), "a window scored twice"
    assert len(set(after)) == len(after)
    never = every_end - set(before) - set(after)
    counted = restarted.runtime.counters.unclean_stop_unscored
    assert counted == len(never), (counted, sorted(never))
    health = restarted.runtime.health(disk_free=0)
    assert health.dropped_by_reason.get("unclean_stop", 0) == len(never)
    gaps = [g for g in health.lost_records if g.reason == "unclean_stop"]
    if checkpoint_s:
        assert resumed_rows > 0  # the checkpoint's ring: windows go on across the lost rows
        assert len(never) == 0, sorted(never)
        assert not gaps
    else:
        assert resumed_rows == 0
        assert len(never) >= 8, sorted(never)  # up to a window (24 rows) after the restart
        (gap,) = gaps
        assert gap.records == len(never)
        assert gap.first.ToSeconds() == int(min(never))
        assert gap.last.ToSeconds() == int(max(never))
    # A clean stop after it: the next start is not counted as unclean.
    assert not (config.state_dir / "stream" / "running").exists()
