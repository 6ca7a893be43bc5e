"""Partial pushes a killed process left in the artifact store's incoming/ are removed at the
next start once old enough; a young one (another replica's push in progress) stays."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from cloud.artifacts import PREFIX, STALE_PART_S, LocalArtifactStore

pytestmark = pytest.mark.unit
NOW = 1_790_000_000.0


def _part(incoming: Path, name: str, size: int, age_s: float) -> Path:
    path = incoming / name
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_stale_partial_pushes_are_removed_at_start_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a push killed mid-way (SIGKILL) left its .part file for good: only the
    receiving call's own cleanup removed one, and it never ran."""
    root = tmp_path / "artifacts"
    store = LocalArtifactStore(root, clock=lambda: NOW)
    data = b"bundle"
    digest = PREFIX + hashlib.sha256(data).hexdigest()
    store.write(digest, [data])
    incoming = root / "incoming"
    old = _part(incoming, "a" * 32 + ".part", 1000, STALE_PART_S + 1)
    older = _part(incoming, "b" * 32 + ".part", 24, 30 * 86_400)
    young = _part(incoming, "c" * 32 + ".part", 7, STALE_PART_S - 60)
    other = _part(incoming, "notes.txt", 3, 30 * 86_400)  # not a push's: not ours to remove
    with caplog.at_level(logging.WARNING, logger="cloud.artifacts"):
        again = LocalArtifactStore(root, clock=lambda: NOW)
    assert not old.exists() and not older.exists()
    assert young.exists() and other.exists()
    assert again.size(digest) == len(data)  # stored artifacts untouched
    (line,) = [r.getMessage() for r in caplog.records]
    assert "removed 2 partial push file(s) of 1024 bytes" in line, line
    assert old.name in line and older.name in line and young.name not in line, line


def test_a_start_with_nothing_stale_says_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "artifacts"
    LocalArtifactStore(root, clock=lambda: NOW)
    _part(root / "incoming", "d" * 32 + ".part", 5, 10)
    with caplog.at_level(logging.WARNING, logger="cloud.artifacts"):
        LocalArtifactStore(root, clock=lambda: NOW)
    assert caplog.records == []
    assert (root / "incoming" / ("d" * 32 + ".part")).exists()
