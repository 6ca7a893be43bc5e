"""What the agent writes to serve a model is synced before it is trusted, and what a power
cut or a kill leaves behind is repaired, not served or kept forever: a `.tar` bundle's unpacked
copy (torn, stale after the archive changed, staging of a killed unpack)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.model.bundle_writer import pack
from edge_agent.config import ModelChoice
from edge_agent.serving import SOURCE, open_serving
from tests.support.bundles import make_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """The inodes `os.fsync` was given."""
    inodes: set[int] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        inodes.add(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield inodes


# ---- a .tar bundle ----


def _archive(trained: tuple[Path, Ed25519PrivateKey], root: Path, version: str) -> Path:
    """The trained bundle as `version`, packed as `root/pump-1.tar` (same name every time)."""
    _, key = trained
    bundle = make_version(trained, root / f"v{version}" / "bundle", version, key)
    return pack(bundle, root / "pump-1.tar")


def test_an_unpacked_bundle_is_synced_and_marked_with_its_archive(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], fsynced: set[int]
) -> None:
    _, key = trained
    archive = _archive(trained, tmp_path, "1")
    models = tmp_path / "models"
    open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e").close()
    target = models / "pump-1"
    unsynced = [p.name for p in (target, *target.iterdir()) if p.stat().st_ino not in fsynced]
    assert unsynced == [], f"written without fsync: {unsynced}"
    assert models.stat().st_ino in fsynced, "the rename into place was not synced"
    assert (target / SOURCE).read_text().startswith("sha256:")
    assert sorted(p.name for p in models.iterdir()) == ["pump-1"], "staging left behind"


def test_a_torn_file_in_an_unpacked_bundle_is_unpacked_again(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    _, key = trained
    archive = _archive(trained, tmp_path, "1")
    models = tmp_path / "models"
    open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e").close()
    victim = models / "pump-1" / "model.fp32.onnx"
    size = victim.stat().st_size
    victim.write_bytes(b"")  # what a power cut leaves of an unsynced extraction
    model = open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e")
    model.close()
    assert victim.stat().st_size == size and model.version == "1"


def test_a_new_archive_under_the_same_name_is_unpacked_and_served(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    _, key = trained
    models = tmp_path / "models"
    archive = _archive(trained, tmp_path, "1")
    open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e").close()
    archive = _archive(trained, tmp_path, "2")
    model = open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e")
    model.close()
    assert model.version == "2"
    assert sorted(p.name for p in models.iterdir()) == ["pump-1"], "the old copy left behind"


def test_staging_a_killed_unpack_left_is_swept(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    _, key = trained
    archive = _archive(trained, tmp_path, "1")
    models = tmp_path / "models"
    open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e").close()
    stale = models / ".pump-1.99999.tmp" / "bundle"
    shutil.copytree(models / "pump-1", stale)
    (models / ".active.json.tmp").write_bytes(b"{}")  # a file: the slots' own, not swept
    open_serving(archive, key.public_key(), ModelChoice(), models, tmp_path / "e").close()
    assert sorted(p.name for p in models.iterdir()) == [".active.json.tmp", "pump-1"]
