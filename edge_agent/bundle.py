"""Model bundles: the manifest format, and loading that refuses anything that does not verify.

A bundle is a directory (or a `.tar` of one) holding `manifest.json`, `manifest.sig` (an
Ed25519 signature over the exact bytes of `manifest.json`) and the files the manifest lists
with their sha256. Loading checks the signature against a pinned public key first, then every
digest; nothing in a bundle is used before both pass. This is a contract module: the cloud
writes bundles with these types.
"""

from __future__ import annotations

import errno
import hashlib
import json
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent import __version__
from edge_agent.errors import (
    AutoglmError,
    IntegrityError,
    InvalidInput,
    LocalStateError,
    NotFound,
)
from edge_agent.files import write_failure
from edge_agent.trust import Verifier

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT_VERSION = 1
BUILD_ON_DEVICE = "build-on-device"
NAME_MAX = 255  # bytes in one path component (ext4, XFS, btrfs, tmpfs all stop there)
# What a damaged archive raises while it is read: tarfile's own errors, and those of the
# decompressors beneath it (a truncated stream, a bad CRC: gzip's is an OSError without errno).
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sensor(_Strict):
    name: str
    unit: str = ""


class Sampling(_Strict):
    period_s: float = Field(gt=0)
    max_staleness_s: float = Field(ge=0)


class Windowing(_Strict):
    length: int = Field(ge=2)
    stride: int = Field(ge=1)


class TensorSpec(_Strict):
    name: str
    shape: list[int | str]
    dtype: str = "float32"


class Decision(_Strict):
    """`edge_agent.calibration.DecisionParams`; fields added later have their old meaning as
    default, so bundles made before them load unchanged."""

    prob_threshold: float
    residual_threshold: float
    residual_quantile: float
    smoothing: int
    scale_floor: float
    level_window: int = 0
    level_threshold: float = 8.0
    joint_threshold: float = 6.0
    level_tolerance: tuple[float, ...] = ()
    spread_threshold: float = 4.0
    spread_tolerance: tuple[float, ...] = ()
    residual_tolerance: tuple[float, ...] = ()
    forecast_away: bool = False
    subspace: bool = False
    subspace_threshold: float = 8.0
    subspace_tolerance: tuple[float, ...] = ()
    supervised: bool = True
    combine: str = "max"
    alone: float = 0.0
    alert_windows: int = 3
    target_far: float = 0.05


class Normalisation(_Strict):
    """Baked into the network; kept here too for the calibration's affine map."""

    center: list[float]
    scale: list[float]


class Variant(_Strict):
    """One runnable form of the model."""

    name: str
    file: str
    format: Literal["onnx", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"]
    target_profile: str = "any"
    sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)


class Golden(_Strict):
    """Inputs and expected outputs for the device self-test."""

    file: str
    sha256: str
    tolerance: float


class Manifest(_Strict):
    """Everything an agent needs to run, calibrate and self-test the model."""

    format: int = FORMAT_VERSION
    name: str
    version: str
    created_at: str
    min_agent_version: str
    sensors: list[Sensor]
    sampling: Sampling
    window: Windowing
    calibration_rows: int = Field(ge=2)
    network: dict[str, float | int]
    normalisation: Normalisation
    decision: Decision
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    variants: list[Variant]
    files: dict[str, str] = Field(default_factory=dict)
    golden: Golden
    engines: dict[str, str] = Field(default_factory=dict)
    training: dict[str, object] = Field(default_factory=dict)
    evaluation: dict[str, object] = Field(default_factory=dict)
    export: dict[str, float | int | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _paths_stay_inside(self) -> Manifest:
        """Every file is a plain relative path: checked when the manifest is read, before
        anything is downloaded or written (a signed manifest naming `../x` or `/etc/x` must
        not make an agent write there)."""
        for name in bundle_paths(self):
            parts = PurePosixPath(name).parts
            if (
                not name
                or "\\" in name
                or name.startswith(("/", "~"))
                or any(p in ("..", ".") for p in parts)
                or name in (MANIFEST, SIGNATURE)
                or "\x00" in name
            ):
                raise ValueError(f"file {name!r} is not a plain relative path inside the bundle")
            for part in parts:
                try:
                    size = len(os.fsencode(part))
                except UnicodeError:
                    raise ValueError(f"file {name!r} is not a valid file name") from None
                if size > NAME_MAX:
                    raise ValueError(
                        f"file {name!r}: the name {part[:40]!r}… is {size} bytes, over the "
                        f"{NAME_MAX} a file system takes"
                    )
        _no_file_is_a_folder(bundle_paths(self))
        return self

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise NotFound(f"bundle {self.name}:{self.version} has no variant {name!r}")


def _no_file_is_a_folder(names: Iterable[str]) -> None:
    """ValueError when one listed file is also a folder above another (`a` and `a/b`): both
    cannot be written."""
    listed = {PurePosixPath(name).parts: name for name in names}
    for parts, name in sorted(listed.items()):
        for depth in range(1, len(parts)):
            above = listed.get(parts[:depth])
            if above is not None:
                raise ValueError(
                    f"file {above!r} is also the folder holding {name!r}: both cannot be written"
                )


def bundle_paths(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest lists (besides itself and its signature): path -> sha256 hex."""
    listed = dict(manifest.files)
    for variant in manifest.variants:
        listed[variant.file] = variant.sha256
    listed[manifest.golden.file] = manifest.golden.sha256
    return listed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_public_key(pem: bytes, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise InvalidInput(f"{where}: not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInput(f"{where}: not an Ed25519 public key")
    return key


def parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{where}: manifest is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":  # written by a newer trainer
            raise IntegrityError(
                f"{where}: manifest field {field!r} is unknown to this agent ({__version__}): "
                "the bundle was made for a newer agent; upgrade the agent to serve it"
            ) from None
        what = f"manifest field {field!r}" if field else "manifest"  # "": the whole model's
        raise IntegrityError(f"{where}: {what}: {first['msg']}") from None


def read_signed_manifest(directory: Path, public_key: Verifier) -> Manifest:
    """The manifest, after its signature verified with a trusted key (files not checked)."""
    manifest_path = directory / MANIFEST
    signature_path = directory / SIGNATURE
    for needed in (manifest_path, signature_path):
        if not _is_file(needed):
            raise IntegrityError(f"{directory}: not a bundle ({needed.name} missing)")
    raw = _read(manifest_path)
    signature = _read(signature_path)
    try:
        public_key.verify(signature, raw)
    except InvalidSignature:
        raise IntegrityError(
            f"{manifest_path}: signature does not verify with a trusted signing key"
        ) from None
    manifest = parse_manifest(raw, str(manifest_path))
    if manifest.format != FORMAT_VERSION:
        raise IntegrityError(f"{manifest_path}: bundle format {manifest.format} not supported")
    return manifest


def verify_bundle(directory: Path, public_key: Verifier, partial: bool = False) -> Manifest:
    """Check the signature, then every listed file's digest; return the manifest.

    `partial`: a device downloads only the variant it runs, so variant files may be absent
    (whoever opens a variant checks its file is there); every file present must match.
    A file the disk cannot read (EIO, EACCES) is a LocalStateError naming it: the disk's
    fault, not the bundle's."""
    manifest = read_signed_manifest(directory, public_key)
    listed = bundle_paths(manifest)
    optional = {v.file for v in manifest.variants} if partial else set()
    for name, digest in sorted(listed.items()):
        path = _inside(directory, name)
        missing = IntegrityError(f"{directory}: {name} is listed in the manifest but missing")
        if not _is_file(path):
            if name in optional:
                continue
            raise missing
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise missing from None
        except OSError as exc:
            raise _unreadable(path, exc) from None
        if actual != digest:
            raise IntegrityError(
                f"{path}: sha256 {actual[:16]}… does not match the manifest's {digest[:16]}…"
            )
    return manifest


def unpack_tar(archive: Path, destination: Path) -> Path:
    """Extract a bundle archive safely (no links, no paths outside) and return its directory.

    A damaged archive is an IntegrityError; a disk that does not take the extraction (full,
    read-only) or cannot read the archive is a LocalStateError saying so: not the bundle's
    fault, so nothing calls the bundle bad for it."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
        candidates = [p.parent for p in destination.rglob(MANIFEST)]
    except FileNotFoundError as exc:
        if Path(exc.filename or archive) == archive:
            raise NotFound(f"{archive}: no such bundle archive") from None
        raise _unpack_failure(archive, destination, exc) from None
    except _DAMAGED as exc:
        raise IntegrityError(f"{archive}: not a readable bundle archive: {exc}") from None
    except OSError as exc:
        raise _unpack_failure(archive, destination, exc) from None
    if len(candidates) != 1:
        raise IntegrityError(f"{archive}: expected one {MANIFEST}, found {len(candidates)}")
    return candidates[0]


def _unpack_failure(archive: Path, destination: Path, exc: OSError) -> AutoglmError:
    """Why extracting `archive` into `destination` failed: a damaged compressed stream (an
    OSError without errno, such as gzip's bad CRC) or members that clash (a file `x` and a
    member `x/y` under it) are the archive's fault; a full or read-only disk, or any other
    error of the system, is the disk's."""
    if exc.errno is None:
        return IntegrityError(f"{archive}: not a readable bundle archive: {exc}")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):  # `x` then `x/y`, or back
        where = f" at {exc.filename}" if exc.filename else ""
        return IntegrityError(
            f"{archive}: a member is both a file and a folder{where} ({exc.strerror or exc})"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return write_failure(destination, exc, f"extract {archive.name} into")
    where = f" at {exc.filename}" if exc.filename else ""
    return LocalStateError(
        f"cannot extract {archive} into {destination}{where} ({exc.strerror or exc})"
    )


def _unreadable(path: Path, exc: OSError) -> LocalStateError:
    return LocalStateError(f"cannot read {path} ({exc.strerror or exc}): the disk, not the bundle")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError as exc:  # EIO, EACCES (a missing file is False)
        raise _unreadable(path, exc) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path.parent}: not a bundle ({path.name} missing)") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _inside(directory: Path, name: str) -> Path:
    try:
        path = (directory / name).resolve()
        inside = directory.resolve() in path.parents
    except RuntimeError as exc:  # a symbolic link loop (an OSError, ELOOP, from 3.13)
        raise IntegrityError(f"{directory}: cannot resolve {name}: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{directory}: cannot resolve {name}: {exc}") from None
        raise _unreadable(directory / name, exc) from None
    if not inside:
        raise IntegrityError(f"{directory}: manifest names a file outside the bundle: {name}")
    return path
