"""A kill -9 with the default `outbox.prediction_every` (10: most windows are decided without
a record): the scoring marks are written without records too, so the restarted data path
decides no window the killed one had decided (a second time, on the rows the kill lost) and
counts exactly the windows nobody scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent import sink as sink_mod
from tests.support.bundles import train_small
from tests.support.datapath import START, Site, pump, site_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
KILL, CHECKPOINT = 290, 282  # rows 282-289 acknowledged, then lost with the killed agent


def test_windows_decided_without_records_are_not_decided_again_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The marks at every chance (the runtime writes them every ingest.checkpoint_s): the kill
    # below comes within a fraction of a second of the windows it tests.
    monkeypatch.setattr(sink_mod, "MARK_EVERY_S", 0.0, raising=False)
    bundle, key = train_small(tmp_path / "model")
    rows = pump(400, faulty=False, seed=1)
    whole = Site(site_config(tmp_path / "a", bundle), bundle, key.public_key(), tmp_path / "a")
    whole.feed(rows, 0)
    every_end = {v.window_end - START for v in whole.verdicts}
    whole.stop()

    config = site_config(tmp_path / "b", bundle)
    assert config.outbox.prediction_every == 10
    # No periodic checkpoints (the test writes one itself): the sink then keeps its default
    # marks interval, MARK_EVERY_S, set to 0 above.
    config.ingest.checkpoint_s = 0
    killed = Site(config, bundle, key.public_key(), tmp_path / "b1")
    killed.feed(rows[: KILL - 30], 0)
    for i in range(KILL - 30, KILL):  # one row a period: a window a transaction, as live
        if i == CHECKPOINT:
            runtime, model = killed.runtime, killed.model
            state = runtime.runners[0].snapshot()
            runtime.streams.write("pump-1", model.version, model.schema.names, state)
        killed.feed(rows[i : i + 1], i)
    before = [v.window_end - START for v in killed.verdicts]
    mark = killed.outbox.scored_through()["pump-1"] - START
    killed.stop()  # as a kill -9 leaves it
    assert mark == max(before), f"decided up to row {max(before):g}, the mark says {mark:g}"

    restarted = Site(config, bundle, key.public_key(), tmp_path / "b2")
    assert restarted.runtime.unclean
    restarted.feed(rows[KILL:], KILL)
    after = [v.window_end - START for v in restarted.verdicts]
    restarted.stop(graceful=True)
    twice = sorted(set(before) & set(after))
    assert not twice, f"decided a second time after the restart: {twice}"
    never = sorted(every_end - set(before) - set(after))
    counted = restarted.runtime.counters.unclean_stop_unscored
    assert counted == len(never), (counted, never)
