"""A download whose destination the file system cannot hold is the bundle's fault (an
IntegrityError, reported and not retried), never a bare OSError escaping the install or a
local state error retried for ever: a name over 255 bytes, a file listed where another
file's folder goes. A disk that fails under the download stays the disk's fault.

The control plane is a stub serving blobs by digest (tests/test_install_disk_full.py)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from edge_agent.download import PartFile
from edge_agent.errors import IntegrityError, LocalStateError
from tests.test_install_disk_full import Disk, Stub, StubDownloader, _digest

pytestmark = pytest.mark.unit
DATA = b"x" * 100


def _downloader() -> StubDownloader:
    return StubDownloader(Stub({_digest(DATA): DATA}), Disk())


def test_a_name_too_long_is_the_bundles_fault(tmp_path: Path) -> None:
    dest = tmp_path / ("f" * 300 + ".onnx")
    with pytest.raises(IntegrityError, match="cannot write") as raised:
        asyncio.run(_downloader().fetch([(_digest(DATA), dest)]))
    assert "f" * 300 in str(raised.value)


@pytest.mark.parametrize("order", ["file first", "folder first"])
def test_a_file_listed_where_a_folder_goes_is_the_bundles_fault(tmp_path: Path, order: str) -> None:
    pairs = [(_digest(DATA), tmp_path / "a"), (_digest(DATA), tmp_path / "a" / "b")]
    if order == "folder first":
        pairs.reverse()
    with pytest.raises(IntegrityError, match="cannot write"):
        asyncio.run(_downloader().fetch(pairs))
    assert not (tmp_path / "a.part").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_a_disk_that_fails_under_a_download_is_the_disks_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def write(self: PartFile, block: bytes) -> None:
        raise OSError(code, "failed")

    monkeypatch.setattr(PartFile, "_write", write)
    with pytest.raises(LocalStateError):
        asyncio.run(_downloader().fetch([(_digest(DATA), tmp_path / "model.onnx")]))
    assert not (tmp_path / "model.onnx.part").exists()
