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


def test_a_damaged_state_file_is_dropped_not_fatal(tmp_path: Path) -> None:
    """Bit rot, a cut file or a file without its keys: the stream starts afresh, the file goes,
    and the agent starts (a damaged file used to raise zipfile.BadZipFile out of the start)."""
    states = StreamStates(tmp_path / "stream")
    states.write("pump-1", "v1", SENSORS, {"x": np.arange(50.0)})
    whole = (tmp_path / "stream" / "pump-1.npz").read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    damaged = {
        "garbage": b"not a zip at all",
        "cut": whole[: len(whole) // 2],
        "flipped": bytes(flipped),
        "empty": b"",
    }
    for name, content in damaged.items():
        (tmp_path / "stream" / "pump-1.npz").write_bytes(content)
        assert states.take("pump-1", "v1", SENSORS, keep=True) is None, name
        assert not (tmp_path / "stream" / "pump-1.npz").exists(), name
    np.savez(tmp_path / "stream" / "pump-1.npz", x=np.zeros(2))  # no model_version, no sensors
    assert states.take("pump-1", "v1", SENSORS, keep=True) is None
    assert not (tmp_path / "stream" / "pump-1.npz").exists()
