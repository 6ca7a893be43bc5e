"""A state file renamed into place, deleted, or written into a folder made for it survives a
power cut: the folder holding the change is fsynced after it (the file's own fsync does not
make its directory entry durable). Checked by recording which inodes `os.fsync` is given."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent import files
from edge_agent.calibration import SiteCalibration
from edge_agent.calibration_store import CalibrationStore
from edge_agent.files import make_dir_durably, remove_durably, replace_atomically
from edge_agent.open_alerts import OpenAlerts

pytestmark = pytest.mark.unit


class Syncs:
    """The (device, inode) of every descriptor fsynced since the last `clear`."""

    def __init__(self) -> None:
        self.inodes: list[tuple[int, int]] = []

    def clear(self) -> None:
        self.inodes.clear()

    def synced(self, path: Path) -> bool:
        st = path.stat()
        return (st.st_dev, st.st_ino) in self.inodes


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Syncs]:
    recorded = Syncs()
    real: Callable[[int], None] = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        recorded.inodes.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield recorded


def test_a_replaced_file_has_its_folder_synced(tmp_path: Path, syncs: Syncs) -> None:
    replace_atomically(tmp_path / "state.json", b"{}", 0o644)
    assert syncs.synced(tmp_path), "the folder of the rename was not fsynced"
    assert syncs.synced(tmp_path / "state.json")


def test_a_removal_has_its_folder_synced(tmp_path: Path, syncs: Syncs) -> None:
    (tmp_path / "gone").write_bytes(b"x")
    syncs.clear()
    assert remove_durably(tmp_path / "gone")
    assert syncs.synced(tmp_path)
    syncs.clear()
    assert not remove_durably(tmp_path / "gone")  # nothing there: nothing to sync
    assert syncs.inodes == []


def test_new_folders_have_their_parents_synced(tmp_path: Path, syncs: Syncs) -> None:
    make_dir_durably(tmp_path / "a" / "b")
    assert syncs.synced(tmp_path) and syncs.synced(tmp_path / "a")
    syncs.clear()
    make_dir_durably(tmp_path / "a" / "b")  # there already: nothing to sync
    assert syncs.inodes == []


def test_a_held_mark_makes_its_folder_durably_and_its_release_is_synced(
    tmp_path: Path, syncs: Syncs
) -> None:
    """The outbox keeps the open alerts, so the alerts folder may not exist when a
    maintenance period holds a raise back: `hold` makes it."""
    alerts = OpenAlerts(tmp_path / "alerts")
    alerts.hold("pump-1")
    assert alerts.is_held("pump-1"), "the held mark was not kept"
    assert syncs.synced(tmp_path), "the new alerts folder's entry was not fsynced"
    assert syncs.synced(tmp_path / "alerts")
    syncs.clear()
    alerts.release("pump-1")
    assert not alerts.is_held("pump-1")
    assert syncs.synced(tmp_path / "alerts"), "the unlink of the held mark was not fsynced"


def test_a_first_calibration_has_its_new_folder_synced(tmp_path: Path, syncs: Syncs) -> None:
    z = np.ones(2, dtype=np.float32)
    store = CalibrationStore(tmp_path / "calibration")
    store.save("1", "pump-1", ("a", "b"), SiteCalibration(z, z, z, 10), [])
    for folder in (tmp_path, tmp_path / "calibration", tmp_path / "calibration" / "1"):
        assert syncs.synced(folder), folder


@pytest.fixture
def no_dir_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses fsync on a directory with EINVAL (some FUSE, 9p, vboxsf)."""
    real: Callable[[int], None] = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files, "_dir_fsync_unsupported_logged", False, raising=False)


@pytest.mark.usefixtures("no_dir_fsync")
def test_writes_succeed_where_directories_cannot_be_fsynced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.json"
    replace_atomically(state, b"old", 0o600)
    replace_atomically(state, b"new", 0o600)
    make_dir_durably(tmp_path / "a" / "b")
    assert remove_durably(state)
    assert not state.exists()
    assert (tmp_path / "a" / "b").is_dir()
    warnings = [r for r in caplog.records if "cannot fsync a directory" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(tmp_path) in warnings[0].getMessage()


def test_other_directory_fsync_failures_still_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as caught:
        files.fsync_dir(tmp_path)
    assert caught.value.errno == errno.EIO
