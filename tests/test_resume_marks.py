"""After a kill -9 the windows the killed agent kept are not decided again, and only those:
the mark (the last window kept) follows its stream back when the asset's clock steps back,
is voided when the stream restarts, and a mark far ahead of where the stream resumed (of
before such a step) skips nothing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from edge_agent.health import RuntimeCounters
from edge_agent.losses import LossLog
from edge_agent.site_decisions import SiteDecisions

pytestmark = pytest.mark.unit
PERIOD_S = 1.0
FAR_S = 300.0  # the aligner's `late_far`: a clock step back at least this far restarts


def decisions() -> tuple[SiteDecisions, Any]:
    runner = SimpleNamespace(
        index=0, name="pump-1", clock_steps=0, aligner=SimpleNamespace(far_s=FAR_S)
    )
    model = SimpleNamespace(spec=SimpleNamespace(stride=1, period_s=PERIOD_S))
    site = SiteDecisions(
        None,  # type: ignore[arg-type]  # what resuming reads: the spec, the runner
        model,  # type: ignore[arg-type]
        [runner],  # type: ignore[list-item]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        RuntimeCounters(),
        LossLog(),
    )
    return site, runner


def window(end: float) -> Any:
    return SimpleNamespace(asset=0, window_end=end)


def test_only_the_windows_kept_before_the_kill_are_skipped() -> None:
    site, runner = decisions()
    site.resume(runner, 1010.0)
    end = 1000.0
    while not site._resumed(window(end)):  # as the sink asks, until one is decided
        end += PERIOD_S
    assert end == 1011.0 and site.rescored_skipped[0] == 11, (end, site.rescored_skipped)
    assert site.counters.unclean_stop_unscored == 0


def test_a_mark_far_ahead_of_the_resumed_stream_skips_nothing() -> None:
    # The clock stepped back an hour, the stream restarted at the new time, then a kill -9:
    # the mark of before the step must not hold decisions back for an hour.
    site, runner = decisions()
    site.resume(runner, 1000.0 + 3600.0)
    assert site._resumed(window(1000.0)), "a window an hour before a stale mark was skipped"
    assert site.rescored_skipped[0] == 0 and site.counters.unclean_stop_unscored == 0


def test_a_clock_step_voids_the_mark_until_the_next_window_is_decided() -> None:
    site, runner = decisions()
    site.resume(runner, 4600.0)
    assert site.marks() == {"pump-1": 4600.0}
    runner.clock_steps += 1  # the pipeline thread restarted the stream
    assert site.marks() == {"pump-1": None}
