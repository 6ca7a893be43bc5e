"""A disk that fails under a bundle is reported as the disk's fault, never the bundle's: a
full or read-only disk while a `.tar` is extracted, an I/O error while the manifest, its
signature or a listed file is read. An archive that is damaged stays an IntegrityError,
also where the decompressor beneath tarfile is what notices.

The failures are stand-ins (OSError raised where the real one arises: tarfile's write of a
member, pathlib's open and stat); making a real disk fail needs privileges CI may not have.
The bundle is a minimal signed manifest with two small files: no model is trained."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.model.bundle_writer import pack, write_signed_manifest
from edge_agent import serving
from edge_agent.bundle import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    parse_manifest,
    read_signed_manifest,
    unpack_tar,
    verify_bundle,
)
from edge_agent.config import ModelChoice
from edge_agent.errors import IntegrityError, LocalStateError, NotFound
from edge_agent.updates import InstallBlocked, InstallFailed, fetch_verified
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit
EIO = OSError(errno.EIO, "Input/output error")


def _manifest(files: dict[str, bytes]) -> Manifest:
    def sha(name: str) -> str:
        return hashlib.sha256(files[name]).hexdigest()

    spec = {"name": "x", "shape": [1, 4, 2]}
    return Manifest.model_validate(
        {
            "name": "pump",
            "version": "2",
            "created_at": "2026-11-01T12:00:00Z",
            "min_agent_version": "0",
            "sensors": [{"name": "a"}, {"name": "b"}],
            "sampling": {"period_s": 1.0, "max_staleness_s": 5.0},
            "window": {"length": 4, "stride": 1},
            "calibration_rows": 10,
            "network": {},
            "normalisation": {"center": [0.0, 0.0], "scale": [1.0, 1.0]},
            "decision": {
                "prob_threshold": 0.5,
                "residual_threshold": 3.0,
                "residual_quantile": 0.99,
                "smoothing": 1,
                "scale_floor": 0.01,
            },
            "inputs": [spec],
            "outputs": [spec],
            "opset": 17,
            "variants": [
                {
                    "name": "fp32",
                    "file": "model.onnx",
                    "format": "onnx",
                    "precision": "fp32",
                    "sha256": sha("model.onnx"),
                }
            ],
            "golden": {"file": "golden.npz", "sha256": sha("golden.npz"), "tolerance": 0.01},
        }
    )


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def bundle(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> Path:
    directory = tmp_path / "pump-2"
    directory.mkdir()
    files = {"model.onnx": b"not really onnx" * 100, "golden.npz": b"golden" * 50}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    write_signed_manifest(directory, _manifest(files), key)
    verify_bundle(directory, key.public_key())  # sound before anything fails under it
    return directory


def _failing(monkeypatch: pytest.MonkeyPatch, method: str, name: str, exc: OSError) -> None:
    """Path.`method` ("open", "stat") raises `exc` for files named `name`."""
    real = getattr(Path, method)

    def failing(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == name:
            raise OSError(exc.errno, exc.strerror, str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("open", MANIFEST),
        ("open", SIGNATURE),
        ("open", "model.onnx"),
        ("stat", MANIFEST),
        ("stat", "golden.npz"),
    ],
)
def test_a_file_the_disk_cannot_read_is_the_disks_fault_named(
    bundle: Path,
    key: ed25519.Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    name: str,
) -> None:
    _failing(monkeypatch, method, name, EIO)
    with pytest.raises(LocalStateError) as raised:
        verify_bundle(bundle, key.public_key())
    message = str(raised.value)
    assert f"cannot read {bundle / name}" in message, message
    assert "Input/output error" in message and "not the bundle" in message, message
    if name in (MANIFEST, SIGNATURE):
        with pytest.raises(LocalStateError, match="Input/output error"):
            read_signed_manifest(bundle, key.public_key())


def test_a_file_that_does_not_match_is_still_the_bundles_fault(
    bundle: Path, key: ed25519.Ed25519PrivateKey
) -> None:
    (bundle / "golden.npz").write_bytes(b"changed")
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        verify_bundle(bundle, key.public_key())
    (bundle / "golden.npz").unlink()
    with pytest.raises(IntegrityError, match=r"golden\.npz is listed in the manifest but missing"):
        verify_bundle(bundle, key.public_key())


class _Downloads:
    """The control plane's artifacts by digest, copied into the slot as a download would."""

    def __init__(self, bundle: Path) -> None:
        self.blobs = {
            "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes()
            for p in bundle.iterdir()
        }

    async def fetch(self, files: list[tuple[str, Path]]) -> None:
        for digest, path in files:
            path.write_bytes(self.blobs[digest])


def _desired(bundle: Path) -> agent_pb2.DesiredState:
    def digest(name: str) -> str:
        return "sha256:" + hashlib.sha256((bundle / name).read_bytes()).hexdigest()

    return agent_pb2.DesiredState(
        model_name="pump",
        model_version="2",
        manifest_digest=digest(MANIFEST),
        signature_digest=digest(SIGNATURE),
        rollout_id="r1",
    )


@pytest.mark.parametrize("name", [MANIFEST, "model.onnx"])
def test_an_install_that_cannot_read_what_it_downloaded_is_blocked_not_failed(
    bundle: Path,
    key: ed25519.Ed25519PrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    """Blocked: reported as the disk's and tried again. Not VERIFY_FAILED, which would tell
    the control plane the version is bad."""
    slot = tmp_path / "slot"
    slot.mkdir()
    downloads, desired = _Downloads(bundle), _desired(bundle)
    choice = ModelChoice(backend="onnxruntime", precision="fp32")
    real_open = Path.open

    def failing(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.parent == slot and self.name == name and "r" in mode:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_open(self, mode, *args, **kwargs)

    def fetch() -> Manifest:
        downloader: Any = downloads
        return asyncio.run(fetch_verified(downloader, slot, desired, key.public_key(), choice))

    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(InstallBlocked, match=re.escape(f"cannot read {slot / name}")):
        fetch()
    monkeypatch.undo()
    assert fetch().version == "2"  # the disk reads again: installed
    # A file that does not match is still the version's failure.
    downloads.blobs = {
        d: b"torn" if b.startswith(b"golden") else b for d, b in downloads.blobs.items()
    }
    with pytest.raises(InstallFailed) as raised:
        fetch()
    assert raised.value.outcome == agent_pb2.InstallReport.OUTCOME_VERIFY_FAILED


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.ENOSPC, r"disk full: [0-9]+ bytes free at {dest}"),
        (errno.EDQUOT, r"disk full: [0-9]+ bytes free at {dest}"),
        (errno.EROFS, r"read-only file system at {dest}"),
        (errno.EIO, r"cannot extract {archive} into {dest}"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "EIO"],
)
def test_an_extraction_the_disk_does_not_take_is_the_disks_fault(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, said: str
) -> None:
    archive = pack(bundle, tmp_path / "pump-2.tar")
    dest = tmp_path / "unpacked"
    real = tarfile.TarFile.makefile
    written: list[str] = []

    def makefile(self: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        if written:  # the first member fits, the next meets the failure
            raise OSError(code, os.strerror(code), target)
        written.append(target)
        real(self, member, target)

    monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    with pytest.raises(LocalStateError) as raised:
        unpack_tar(archive, dest)
    pattern = said.format(dest=_escaped(dest), archive=_escaped(archive))
    assert raised.match(pattern), str(raised.value)


def test_the_configured_bundle_on_a_full_disk_says_so_and_leaves_no_staging(
    bundle: Path,
    key: ed25519.Ed25519PrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = pack(bundle, tmp_path / "pump-2.tar")
    models = tmp_path / "state" / "models"

    def makefile(self: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    with pytest.raises(LocalStateError, match=r"disk full: [0-9]+ bytes free at"):
        serving.verified(archive, key.public_key(), models)
    assert list(models.iterdir()) == [], "the staging folder keeps the disk full"
    monkeypatch.undo()
    directory, manifest = serving.verified(archive, key.public_key(), models)
    assert manifest.version == "2" and directory.parent == models


def test_the_configured_bundle_unreadable_blames_the_disk_not_the_bundle(
    bundle: Path,
    key: ed25519.Ed25519PrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An I/O error hashing the configured archive is a local state error (the version is
    not marked failed for it), not an integrity error."""
    archive = pack(bundle, tmp_path / "pump-2.tar")

    def unreadable(path: Path) -> str:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(serving, "sha256_file", unreadable)
    with pytest.raises(LocalStateError, match=r"cannot read it \(Input/output error\)"):
        serving.verified(archive, key.public_key(), tmp_path / "models")


def _gzipped(bundle: Path, tmp_path: Path) -> bytes:
    plain = pack(bundle, tmp_path / "plain.tar").read_bytes()
    return gzip.compress(plain)


@pytest.mark.parametrize("damage", ["truncated", "bad crc", "not an archive"])
def test_a_damaged_archive_is_the_archives_fault(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    data = _gzipped(bundle, tmp_path)
    if damage == "truncated":  # the decompressor's EOFError, which escaped before
        data = data[: len(data) * 2 // 3]
    elif damage == "bad crc":  # gzip's BadGzipFile: an OSError, but without errno

        def makefile(self: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
            raise gzip.BadGzipFile("CRC check failed 0x8d10a8aa != 0xead007de")

        monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
    else:
        data = b"neither tar nor gzip" * 40
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(data)
    with pytest.raises(IntegrityError, match="not a readable bundle archive"):
        unpack_tar(archive, tmp_path / "out")


def test_a_missing_archive_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such bundle archive"):
        unpack_tar(tmp_path / "gone.tar", tmp_path / "out")


def _escaped(path: Path) -> str:
    return re.escape(str(path))


def test_gzip_stand_in_is_what_tarfile_reads(bundle: Path, tmp_path: Path) -> None:
    """The damaged archives above are damaged gzip around a sound tar."""
    with tarfile.open(fileobj=io.BytesIO(_gzipped(bundle, tmp_path))) as tar:
        assert any(m.name.endswith(MANIFEST) for m in tar.getmembers())


def _listing(extra: dict[str, str]) -> bytes:
    doc = _manifest({"model.onnx": b"m", "golden.npz": b"g"}).model_dump(mode="json")
    doc["files"] = extra
    return json.dumps(doc).encode()


def test_a_manifest_naming_a_file_too_long_for_a_file_system_is_refused() -> None:
    """Refused when read, before anything is downloaded (a write would fail ENAMETOOLONG)."""
    name = "data/" + "é" * 126 + ".bin"  # 256 bytes in UTF-8, 130 characters
    with pytest.raises(IntegrityError, match=r"256 bytes, over the 255") as raised:
        parse_manifest(_listing({name: "0" * 64}), "m.json")
    assert "data/" in str(raised.value)
    parse_manifest(_listing({"data/" + "e" * 255: "0" * 64}), "m.json")  # 255 is fine


@pytest.mark.parametrize(
    ("listed", "file", "inner"),
    [
        (["a", "a/b"], "a", "a/b"),
        (["x/a", "x/a/b/c"], "x/a", "x/a/b/c"),
        (["model.onnx/w"], "model.onnx", "model.onnx/w"),  # a variant's file is a folder
    ],
)
def test_a_manifest_listing_a_file_that_is_also_a_folder_is_refused(
    listed: list[str], file: str, inner: str
) -> None:
    with pytest.raises(IntegrityError) as raised:
        parse_manifest(_listing(dict.fromkeys(listed, "0" * 64)), "m.json")
    assert f"{file!r} is also the folder holding {inner!r}" in str(raised.value)


def test_sibling_files_and_shared_folders_are_fine() -> None:
    parse_manifest(_listing(dict.fromkeys(["a/b", "a/c", "ab", "a.b/c"], "0" * 64)), "m.json")


def _tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of the files (name, bytes) in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("b/x", b"file"), ("b/x/y", b"under a file")],
        [("b/x/y", b"in a folder"), ("b/x", b"over the folder")],
    ],
    ids=["file then under it", "folder then a file over it"],
)
def test_an_archive_whose_members_clash_is_the_archives_fault(
    tmp_path: Path, members: list[tuple[str, bytes]]
) -> None:
    archive = _tar_of(tmp_path / "clash.tar", [("b/manifest.json", b"{}"), *members])
    with pytest.raises(IntegrityError, match="both a file and a folder") as raised:
        unpack_tar(archive, tmp_path / "out")
    assert str(archive) in str(raised.value)
