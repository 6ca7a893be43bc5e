"""The stream-state files are durable: each replace and removal in the directory is followed
by an fsync of the directory (a power loss after it cannot bring back the old entry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent import stream_state
from edge_agent.stream_state import StreamStates

pytestmark = pytest.mark.unit
SENSORS = ("flow",)


def test_every_replace_and_removal_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(stream_state, "fsync_dir", synced.append)
    states = StreamStates(tmp_path / "stream")
    states.running()
    states.write("pump-1", "v1", SENSORS, {"x": np.zeros(2)})
    assert states.take("pump-1", "v1", SENSORS, keep=True) is not None
    assert (tmp_path / "stream" / "pump-1.npz").exists()  # kept for a checkpoint to replace
    assert states.take("pump-1", "v1", SENSORS) is not None  # removed
    assert not (tmp_path / "stream" / "pump-1.npz").exists()
    states.stopped()
    assert synced == [tmp_path / "stream"] * 4, synced  # running, write, take, stopped
