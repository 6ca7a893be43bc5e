"""Opening a verified bundle for serving: pick the variant and backend for this hardware,
build and cache a TensorRT engine where the bundle has none for this profile, self-test.

What this writes is synced before it is trusted: a `.tar` bundle is unpacked into a staging
folder, synced, marked with the archive's sha256 and renamed into place; an unpacked bundle
is used again only while that mark matches the archive and it verifies, else the archive is
unpacked again. A cached engine is synced before its rename; one that does not load is
deleted and built again once. Staging left by a kill is swept before the next write.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_agent.bundle import Manifest, Variant, sha256_file, unpack_tar, verify_bundle
from edge_agent.config import ModelChoice
from edge_agent.errors import IntegrityError, InvalidInput, LocalStateError, NotFound
from edge_agent.files import (
    fsync_dir,
    fsync_file,
    make_dir_durably,
    remove_durably,
    sync_tree,
    write_failure,
    write_new,
)
from edge_agent.inference.base import InferenceBackend, open_backend
from edge_agent.scoring import ModelFrame, frame_of
from edge_agent.selftest import check_golden
from edge_agent.trust import Verifier
from edge_agent.windowing import SensorSchema, WindowSpec

log = logging.getLogger(__name__)
SOURCE = ".source-sha256"  # in a bundle unpacked from a .tar: "sha256:<hex>" of that .tar
STAGING = ".tmp"  # the suffix of what is being written (a kill leaves it: swept)


@dataclass(frozen=True)
class Hardware:
    """What inference can use on this machine."""

    tensorrt: bool
    cuda: bool

    @staticmethod
    def detect() -> Hardware:
        cuda = False
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        return Hardware(tensorrt=importlib.util.find_spec("tensorrt") is not None, cuda=cuda)


@dataclass(frozen=True)
class Choice:
    """How to run a bundle: backend kind, the variant, and whether the engine is built here."""

    backend: str  # "onnxruntime" | "tensorrt"
    variant: Variant
    build_engine: bool = False
    precision: str = "fp32"

    @property
    def label(self) -> str:
        if self.backend == "tensorrt":
            return f"tensorrt-{self.precision}"
        return f"onnxruntime-{self.variant.precision}"


def choose(manifest: Manifest, choice: ModelChoice, hw: Hardware) -> Choice:
    """The variant and backend for this device (pure: tested without a GPU)."""
    onnx = {v.precision: v for v in manifest.variants if v.format == "onnx"}
    if "fp32" not in onnx:
        raise InvalidInput(f"bundle {manifest.name}:{manifest.version} has no fp32 ONNX variant")
    want_trt = choice.backend == "tensorrt" or (choice.backend == "auto" and hw.tensorrt)
    if choice.backend == "tensorrt" and not hw.tensorrt:
        raise InvalidInput(
            "model.backend is tensorrt but TensorRT is not installed on this device; use auto "
            "or onnxruntime"
        )
    if want_trt:
        precision = "fp16" if choice.precision == "auto" else choice.precision
        for v in manifest.variants:
            if (
                v.format == "tensorrt"
                and v.precision == precision
                and choice.profile
                and v.target_profile == choice.profile
            ):
                return Choice("tensorrt", v, precision=precision)
        source = onnx.get(precision if precision == "int8" else "fp32", onnx["fp32"])
        return Choice("tensorrt", source, build_engine=True, precision=precision)
    if choice.precision == "auto":
        precision = "fp16" if hw.cuda and "fp16" in onnx else "fp32"
    else:
        precision = choice.precision
    if precision not in onnx:
        log.warning(
            "bundle %s:%s has no %s ONNX variant; serving fp32",
            manifest.name,
            manifest.version,
            precision,
        )
        precision = "fp32"
    return Choice("onnxruntime", onnx[precision])


@dataclass
class ServingModel:
    """A verified, self-tested bundle ready to score windows."""

    directory: Path
    manifest: Manifest
    backend: InferenceBackend
    choice: Choice
    frame: ModelFrame
    schema: SensorSchema
    spec: WindowSpec

    @property
    def version(self) -> str:
        return self.manifest.version

    def close(self) -> None:
        self.backend.close()


def verified(
    bundle: Path, key: Verifier, models_dir: Path, partial: bool = False
) -> tuple[Path, Manifest]:
    """The bundle's directory and its verified manifest: a directory as given, or a `.tar`
    unpacked under `models_dir` (again when the archive changed or the unpacked copy does
    not verify: a power cut may have torn it)."""
    if bundle.is_dir():
        return bundle, verify_bundle(bundle, key, partial=partial)
    if not bundle.is_file():
        raise NotFound(f"model.bundle {bundle}: no such bundle (directory or .tar)")
    try:
        digest = "sha256:" + sha256_file(bundle)
    except OSError as exc:  # the disk's fault, not the bundle's: never mark the model bad
        raise LocalStateError(
            f"model.bundle {bundle}: cannot read it ({exc.strerror or exc}): the disk, "
            "not the bundle"
        ) from None
    target = models_dir / bundle.name.removesuffix(".tar")
    if models_dir.is_dir():
        sweep_staging(models_dir, folders=True)
    if _source_of(target) == digest:
        try:
            return target, verify_bundle(target, key)
        except IntegrityError as exc:
            log.warning("%s does not verify (%s); unpacking %s again", target, exc, bundle)
    elif target.exists():
        log.info("%s changed since %s was unpacked from it; unpacking it again", bundle, target)
    _unpack(bundle, digest, target)
    return target, verify_bundle(target, key)


def _source_of(target: Path) -> str | None:
    """The sha256 of the archive `target` was unpacked from; None when not marked (an
    unpack that did not finish, or one made before the mark existed)."""
    try:
        return (target / SOURCE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _unpack(archive: Path, digest: str, target: Path) -> None:
    """Unpacks `archive` into `target` (replacing what is there): extracted into a staging
    folder, synced, marked with `digest`, then renamed into place and the folder synced."""
    models_dir = target.parent
    staging = models_dir / f".{target.name}.{os.getpid()}{STAGING}"
    old = models_dir / f".{target.name}.{os.getpid()}.old{STAGING}"
    try:
        make_dir_durably(models_dir)
        staging.mkdir()
        directory = unpack_tar(archive, staging)
        write_new(directory / SOURCE, digest.encode(), 0o644)
        sync_tree(staging)
        if target.exists():
            target.rename(old)
        directory.rename(target)
        fsync_dir(models_dir)
    except OSError as exc:
        raise write_failure(models_dir, exc, f"unpack {archive.name} into") from None
    finally:
        for leftover in (staging, old):
            _remove_tree(leftover)
    log.info("unpacked %s into %s", archive, target)


def sweep_staging(directory: Path, folders: bool) -> None:
    """Removes the staging `folders` (else files) named `.*.tmp` that a killed process left
    in `directory`. One agent runs per state directory (the lock), so none of them is being
    written; the other kind is left alone (the model slots keep their pointer's temporary
    file beside the unpacked bundles)."""
    try:
        stale = sorted(p for p in directory.glob(f".*{STAGING}") if p.is_dir() == folders)
    except OSError as exc:
        log.warning("%s: cannot look for staging left by a kill: %s", directory, exc)
        return
    for path in stale:
        log.info("removing %s, left by an unpack or engine build that did not finish", path)
        if folders:
            _remove_tree(path)
            continue
        try:
            remove_durably(path)
        except OSError as exc:
            log.warning("%s: cannot remove it: %s", path, exc)


def _remove_tree(path: Path) -> None:
    """Deletes the folder `path` if there; what cannot go is logged (swept next time)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("%s: cannot remove it: %s", path, exc)


def open_serving(
    bundle: Path,
    key: Verifier,
    choice: ModelChoice,
    models_dir: Path,
    engine_cache: Path,
    hw: Hardware | None = None,
    partial: bool = False,
) -> ServingModel:
    """Verify (signature, digests), choose, open and self-test; nothing runs before all pass.

    `partial`: an install slot, holding only the variant chosen for this device."""
    directory, manifest = verified(bundle, key, models_dir, partial)
    picked = choose(manifest, choice, hw or Hardware.detect())
    if not (directory / picked.variant.file).is_file():
        raise IntegrityError(f"{directory}: variant file {picked.variant.file} is missing")
    if picked.backend == "tensorrt":
        backend: InferenceBackend = _tensorrt(directory, manifest, picked, engine_cache)
    else:
        backend = open_backend(
            "onnxruntime", directory, manifest, picked.variant.name, threads=choice.threads
        )
    try:
        result = check_golden(directory, manifest, picked.variant, backend)
    except Exception:
        backend.close()
        raise
    log.info(
        "serving %s:%s with %s (variant %s); self-test %s",
        manifest.name,
        manifest.version,
        picked.label,
        picked.variant.name,
        result,
    )
    schema = SensorSchema(
        tuple(s.name for s in manifest.sensors), tuple(s.unit for s in manifest.sensors)
    )
    spec = WindowSpec(
        manifest.window.length,
        manifest.window.stride,
        manifest.sampling.period_s,
        manifest.sampling.max_staleness_s,
    )
    return ServingModel(directory, manifest, backend, picked, frame_of(manifest), schema, spec)


def _tensorrt(directory: Path, manifest: Manifest, picked: Choice, cache: Path) -> InferenceBackend:
    """The TensorRT backend: the bundle's engine for this profile, or one built from ONNX
    here and cached. A cached engine that does not load (torn by a power cut, damaged) is a
    cache problem, not the model's: it is deleted and built again, once."""
    from edge_agent.inference import tensorrt as trt

    if not picked.build_engine:
        return trt.TensorRtBackend(directory / picked.variant.file)
    engine = _cached_engine(directory, manifest, picked, cache)
    try:
        return trt.TensorRtBackend(engine)
    except IntegrityError as exc:
        log.warning("the cached engine does not load (%s); building it again", exc)
        try:
            remove_durably(engine)
        except OSError as gone:
            raise write_failure(engine, gone, "delete") from None
    return trt.TensorRtBackend(_cached_engine(directory, manifest, picked, cache))


def _cached_engine(directory: Path, manifest: Manifest, picked: Choice, cache: Path) -> Path:
    """The engine built from the ONNX variant, cached by its digest, precision and TensorRT
    version: built (synced, then renamed into the cache) when not there. `LocalStateError`
    when the cache does not take it (a full disk)."""
    from edge_agent.inference import tensorrt as trt

    name = f"{picked.variant.sha256[:24]}-{picked.precision}-trt{trt.tensorrt_version()}.plan"
    engine = cache / name
    if engine.is_file():
        return engine
    log.info(
        "building a TensorRT %s engine for %s (cached as %s)",
        picked.precision,
        manifest.version,
        engine,
    )
    staging = cache / f".{name}.{os.getpid()}{STAGING}"
    try:
        make_dir_durably(cache)
        sweep_staging(cache, folders=False)
        trt.build_engine(
            directory / picked.variant.file,
            staging,
            manifest.window.length,
            len(manifest.sensors),
            picked.precision,
        )
        fsync_file(staging)
        staging.replace(engine)
        fsync_dir(cache)
    except OSError as exc:
        raise write_failure(cache, exc, "cache a TensorRT engine in") from None
    finally:
        if staging.exists():
            try:
                remove_durably(staging)
            except OSError as exc:
                log.warning("%s: cannot remove it: %s", staging, exc)
    return engine
