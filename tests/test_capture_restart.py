"""How far an open alert is in its captured windows survives a restart.

Before, the per-alert count lived only in memory: each restart (or model swap, which builds a
new data path) during an open alert started it again at 0, and up to `windows_per_alert`
more windows of the same alert were captured. It is now kept in capture.json with the day's
budget, for the alerts open only: an entry goes when its alert clears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.capture import ALERT, CaptureSampler
from edge_agent.config import CapturePolicy
from tests.support.captures import T0

pytestmark = pytest.mark.unit
POLICY = CapturePolicy.model_validate(
    {"windows_per_alert": 3, "alert_spacing": 2, "max_bytes_per_day": 1 << 30}
)


def _clock() -> float:
    return T0


def _captured(sampler: CaptureSampler, key: str, windows: range) -> list[int]:
    """The windows of `windows` captured while alert `key` is open on pump-1."""
    taken = []
    for i in windows:
        reason = sampler.reason_for("pump-1", key, 2.0, T0 + i)
        if reason:
            assert reason == ALERT and sampler.admit(reason, 100, 2.0, T0 + i)
            taken.append(i)
    return taken


def test_a_restart_during_an_open_alert_does_not_capture_its_windows_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "capture.json"
    before = _captured(CaptureSampler(POLICY, path, clock=_clock), "k1", range(3))
    after = _captured(CaptureSampler(POLICY, path, clock=_clock), "k1", range(3, 30))
    assert before == [0, 2], before
    assert len(before + after) == POLICY.windows_per_alert, (before, after)


def test_an_entry_goes_when_its_alert_clears(tmp_path: Path) -> None:
    path = tmp_path / "capture.json"
    sampler = CaptureSampler(POLICY, path, clock=_clock)
    _captured(sampler, "k1", range(2))
    assert json.loads(path.read_bytes())["episodes"] == {"pump-1": ["k1", 0]}  # at the capture
    sampler.reason_for("pump-1", "", 0.1, T0 + 2)  # cleared
    assert json.loads(path.read_bytes())["episodes"] == {}
    again = CaptureSampler(POLICY, path, clock=_clock)
    assert _captured(again, "k2", range(3, 8)) == [3, 5, 7]  # the next alert: all of it


@pytest.mark.parametrize("episodes", [None, [1, 2], {"pump-1": "k1"}, {"pump-1": ["k1", "many"]}])
def test_a_file_without_readable_episodes_keeps_the_days_budget(
    tmp_path: Path, episodes: object
) -> None:
    path = tmp_path / "capture.json"
    doc: dict[str, object] = {"day": int(T0 // 86_400), "bytes": 7, "sample_bytes": 0}
    doc["strata"] = {}
    if episodes is not None:  # None: written before the episodes were kept
        doc["episodes"] = episodes
    path.write_text(json.dumps(doc))
    sampler = CaptureSampler(POLICY, path, clock=_clock)
    assert sampler.today.bytes == 7
    assert _captured(sampler, "k1", range(5)) == [0, 2, 4]
