"""The CLI progress line: its time-left estimate ignores the warm-up of the first step."""

from __future__ import annotations

import io

import pytest

from cloud.model.progress import ProgressBar

pytestmark = pytest.mark.unit


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_the_estimate_uses_the_rate_after_the_first_report_not_the_warm_up() -> None:
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar("train", out, clock=clock)
    clock.now += 80.0  # loading and the first step: slow
    bar(1, 100, 0.5)
    clock.now += 20.0  # then one step per second... no line yet (at most every 10 s off a tty)
    bar(21, 100, 0.4)
    clock.now += 20.0
    bar(41, 100, 0.3)
    lines = _lines(out)
    assert "estimating" in lines[0], lines
    # 40 steps in 40 s: 59 steps left take ~59 s. From the start it would say ~144 s.
    assert lines[-1].endswith("~59s left"), lines
    clock.now += 59.0
    bar(100, 100, 0.2)
    assert _lines(out)[-1].endswith("done"), _lines(out)


def test_a_report_at_step_zero_does_not_anchor_the_rate() -> None:
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar("push", out, unit="bytes", clock=clock)
    bar(0, 1000)
    clock.now += 30.0  # connection set-up
    bar(100, 1000)
    clock.now += 10.0
    bar(600, 1000)
    lines = _lines(out)
    assert "estimating" in lines[0] and "estimating" in lines[1], lines
    assert lines[-1].endswith("~8s left"), lines  # 500 B in 10 s, 400 B left
