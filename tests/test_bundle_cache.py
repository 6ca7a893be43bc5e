"""What the agent writes to serve a model is synced before it is trusted, and what a power
cut or a kill leaves behind is repaired, not served or kept forever: a `.tar` bundle's unpacked
copy (torn, stale after the archive changed, staging of a killed unpack) and the TensorRT
engine cache (a torn engine is built again; TensorRT's own errors become this project's).

TensorRT is not installed here: its module is a stand-in whose "engine" names the ONNX file
it was built from and runs it with ONNX Runtime, so the self-test is the real one."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.model.bundle_writer import pack
from edge_agent.config import ModelChoice
from edge_agent.errors import FailedPrecondition, IntegrityError, LocalStateError
from edge_agent.inference import tensorrt as trt
from edge_agent.inference.onnxruntime import OnnxRuntimeBackend
from edge_agent.serving import SOURCE, Hardware, ServingModel, open_serving
from edge_agent.slots import ModelSlots, SlotInfo
from tests.support.bundles import make_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GPU = Hardware(tensorrt=True, cuda=False)


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


def _serve(trained: tuple[Path, Ed25519PrivateKey], root: Path, archive: Path) -> ServingModel:
    """`archive` opened for serving, unpacked under `root/models`."""
    _, key = trained
    return open_serving(archive, key.public_key(), ModelChoice(), root / "models", root / "e")


def test_an_unpacked_bundle_is_synced_and_marked_with_its_archive(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], fsynced: set[int]
) -> None:
    models = tmp_path / "models"
    _serve(trained, tmp_path, _archive(trained, tmp_path, "1")).close()
    target = models / "pump-1"
    unsynced = [p.name for p in (target, *target.iterdir()) if p.stat().st_ino not in fsynced]
    assert unsynced == [], f"written without fsync: {unsynced}"
    assert models.stat().st_ino in fsynced, "the rename into place was not synced"
    assert (target / SOURCE).read_text().startswith("sha256:")
    assert sorted(p.name for p in models.iterdir()) == ["pump-1"], "staging left behind"


def test_a_torn_file_in_an_unpacked_bundle_is_unpacked_again(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    archive = _archive(trained, tmp_path, "1")
    _serve(trained, tmp_path, archive).close()
    victim = tmp_path / "models" / "pump-1" / "model.fp32.onnx"
    size = victim.stat().st_size
    victim.write_bytes(b"")  # what a power cut leaves of an unsynced extraction
    model = _serve(trained, tmp_path, archive)
    model.close()
    assert victim.stat().st_size == size and model.version == "1"


def test_a_new_archive_under_the_same_name_is_unpacked_and_served(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    _serve(trained, tmp_path, _archive(trained, tmp_path, "1")).close()
    model = _serve(trained, tmp_path, _archive(trained, tmp_path, "2"))
    model.close()
    assert model.version == "2"
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["pump-1"], "the old copy left behind"


def test_staging_a_killed_unpack_left_is_swept(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey]
) -> None:
    archive = _archive(trained, tmp_path, "1")
    models = tmp_path / "models"
    _serve(trained, tmp_path, archive).close()
    stale = models / ".pump-1.99999.tmp" / "bundle"
    shutil.copytree(models / "pump-1", stale)
    (models / ".active.json.tmp").write_bytes(b"{}")  # a file: the slots' own, not swept
    _serve(trained, tmp_path, archive).close()
    assert sorted(p.name for p in models.iterdir()) == [".active.json.tmp", "pump-1"]


# ---- the TensorRT engine cache ----


class FakeTensorRt:
    """Stands in for TensorRT: a built "engine" is the ONNX file's path; loading one runs
    that file with ONNX Runtime, and refuses bytes that are not a path (a torn engine)."""

    def __init__(self) -> None:
        self.builds: list[Path] = []
        self.fail_build: OSError | None = None
        self.torn = False  # every build writes bytes that do not load

    def build_engine(self, onnx: Path, engine: Path, *_: Any) -> None:
        self.builds.append(onnx)
        if self.fail_build is not None:
            engine.write_bytes(b"half")
            raise self.fail_build
        engine.write_bytes(b"torn" if self.torn else str(onnx).encode())

    def backend(self, engine: Path) -> OnnxRuntimeBackend:
        data = engine.read_bytes()
        if not data.endswith(b".onnx"):
            raise IntegrityError(f"{engine}: TensorRT cannot load this engine (torn)")
        return OnnxRuntimeBackend(Path(data.decode()))


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRt:
    fake = FakeTensorRt()
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "10.0")
    monkeypatch.setattr(trt, "build_engine", fake.build_engine)
    monkeypatch.setattr(trt, "TensorRtBackend", fake.backend)
    return fake


def _open_on_gpu(bundle: Path, key: Ed25519PrivateKey, root: Path) -> Any:
    return open_serving(bundle, key.public_key(), ModelChoice(), root / "m", root / "e", hw=GPU)


def test_a_built_engine_is_synced_before_it_is_cached(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    fake_trt: FakeTensorRt,
    fsynced: set[int],
) -> None:
    bundle, key = trained
    model = _open_on_gpu(bundle, key, tmp_path)
    model.close()
    assert model.choice.label == "tensorrt-fp16" and len(fake_trt.builds) == 1
    (engine,) = (tmp_path / "e").iterdir()
    assert engine.name.endswith("-fp16-trt10.0.plan")
    assert engine.stat().st_ino in fsynced, "the engine was renamed into the cache unsynced"
    assert (tmp_path / "e").stat().st_ino in fsynced, "the cache folder was not synced"
    _open_on_gpu(bundle, key, tmp_path).close()
    assert len(fake_trt.builds) == 1, "a cached engine is used, not built again"


def test_a_torn_cached_engine_is_built_again_once(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], fake_trt: FakeTensorRt
) -> None:
    bundle, key = trained
    _open_on_gpu(bundle, key, tmp_path).close()
    (engine,) = (tmp_path / "e").iterdir()
    engine.write_bytes(b"")  # what a power cut leaves of an unsynced save
    model = _open_on_gpu(bundle, key, tmp_path)
    model.close()
    assert model.choice.backend == "tensorrt" and len(fake_trt.builds) == 2
    assert engine.read_bytes().endswith(b".onnx")


def test_an_engine_that_does_not_load_even_when_rebuilt_is_an_integrity_error(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    fake_trt: FakeTensorRt,
) -> None:
    bundle, key = trained
    fake_trt.torn = True
    with pytest.raises(IntegrityError, match="cannot load this engine"):
        _open_on_gpu(bundle, key, tmp_path)
    assert len(fake_trt.builds) == 2, "built again once, not more"


def test_an_engine_cache_on_a_full_disk_is_a_local_state_error(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], fake_trt: FakeTensorRt
) -> None:
    bundle, key = trained
    fake_trt.fail_build = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(LocalStateError, match=r"disk full: [0-9]+ bytes free at .*/e "):
        _open_on_gpu(bundle, key, tmp_path)
    assert list((tmp_path / "e").iterdir()) == [], "the half-written engine stayed"


def test_a_failure_that_is_not_the_models_does_not_mark_the_version_failed(
    tmp_path: Path,
) -> None:
    slots = ModelSlots(tmp_path / "models")
    slots.activate(SlotInfo("a", "pump", "1", "sha256:one"))
    slots.activate(SlotInfo("b", "pump", "2", "sha256:two"))
    back = slots.fall_back("disk full: 0 bytes free at /state/engines", lasting=False)
    assert back is not None and back.version == "1"
    assert slots.failure("sha256:two") is None
    slots.activate(SlotInfo("b", "pump", "2", "sha256:two"))
    slots.fall_back("self-test failed")
    assert slots.failure("sha256:two") == "self-test failed"


# ---- TensorRT's own errors, mapped ----


class Polygraphy:
    """Polygraphy's trt backend as far as the agent uses it, failing where told."""

    def __init__(self, fail: str) -> None:
        self.fail = fail

    def _raise(self, where: str) -> None:
        if self.fail == where:
            raise RuntimeError(f"[TRT] {where} failed")
        if where == "activate" and self.fail == "oom":
            raise RuntimeError(
                "[TRT] [E] 2: [executionContext.cpp::ExecutionContext::470] Error Code 2: "
                "OutOfMemory (no further information)"
            )
        if where == "activate" and self.fail == "context":  # Polygraphy's own words
            raise RuntimeError("Invalid Context. See error log for details.")

    def engine_from_bytes(self, data: bytes) -> object:
        self._raise("deserialize")
        return None if self.fail == "none" else SimpleNamespace(device_memory_size=1 << 30)

    def TrtRunner(self, engine: object) -> Any:
        return SimpleNamespace(activate=lambda: self._raise("activate"))

    def NetworkFromOnnxPath(self, path: str) -> object:
        self._raise("parse")
        return object()

    def Profile(self) -> Any:
        return SimpleNamespace(add=lambda *a, **k: None)

    def CreateConfig(self, **_: Any) -> object:
        return object()

    def EngineFromNetwork(self, *_: Any, **__: Any) -> object:
        return object()

    def SaveEngine(self, _: object, path: str) -> Any:
        def save() -> None:
            if self.fail == "save":
                raise OSError(errno.ENOSPC, "No space left on device")
            Path(path).write_bytes(b"plan")

        return save


def _engine_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: str) -> Path:
    """An engine file, `tmp_path/x.plan`, for a stand-in TensorRT that fails at `fail`."""
    monkeypatch.setattr(trt, "require_tensorrt", lambda: Polygraphy(fail))
    engine = tmp_path / "x.plan"
    engine.write_bytes(b"plan")
    return engine


@pytest.mark.parametrize("fail", ["deserialize", "none"])
def test_an_engine_tensorrt_cannot_load_is_an_integrity_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    engine = _engine_for(monkeypatch, tmp_path, fail=fail)
    with pytest.raises(IntegrityError, match=f"{engine}: TensorRT cannot load this engine"):
        trt.TensorRtBackend(engine)
    with pytest.raises(IntegrityError, match="cannot read the TensorRT engine"):
        trt.TensorRtBackend(tmp_path / "missing.plan")


def test_an_engine_the_gpu_cannot_take_now_is_a_local_state_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of GPU memory (no execution context): this device's state, not the engine's."""
    engine = _engine_for(monkeypatch, tmp_path, fail="oom")
    with pytest.raises(trt.GpuOutOfMemory, match=f"{engine}: .*OutOfMemory.*GPU memory"):
        trt.TensorRtBackend(engine)


def test_an_invalid_context_is_out_of_memory_only_when_the_engine_needs_more_than_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polygraphy says only "Invalid Context": the engine's device memory against the GPU's
    free memory decides; unknown free memory is the engine's fault."""
    engine = _engine_for(monkeypatch, tmp_path, fail="context")
    monkeypatch.setattr(trt, "gpu_free_bytes", lambda: 1 << 20)
    with pytest.raises(trt.GpuOutOfMemory, match=f"needs {1 << 30} bytes .* {1 << 20} are free"):
        trt.TensorRtBackend(engine)
    for free in (None, 2 << 30):
        monkeypatch.setattr(trt, "gpu_free_bytes", lambda free=free: free)
        with pytest.raises(IntegrityError, match="cannot make it ready to run on this device"):
            trt.TensorRtBackend(engine)


def test_an_engine_that_cannot_run_on_this_device_is_the_engines_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing plugin or no kernel for this GPU will not get better by waiting: an
    IntegrityError (the install fails and the rollout counts it), not a LocalStateError
    tried again forever."""
    engine = _engine_for(monkeypatch, tmp_path, fail="activate")
    monkeypatch.setattr(trt, "gpu_free_bytes", lambda: None)
    with pytest.raises(IntegrityError, match=f"{engine}: .*cannot make it ready to run") as err:
        trt.TensorRtBackend(engine)
    assert not isinstance(err.value, LocalStateError)


def test_an_engine_the_disk_cannot_read_is_a_local_state_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine_for(monkeypatch, tmp_path, fail="never")
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == engine:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(LocalStateError, match=r"Input/output error\): the disk, not the engine"):
        trt.TensorRtBackend(engine)


def test_a_cached_engine_the_gpu_cannot_take_now_is_kept_not_rebuilt(
    tmp_path: Path, trained: tuple[Path, Ed25519PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting and rebuilding the cache would not free GPU memory; the engine stays for the
    next try, and the error is a local state error (the install is blocked, not failed)."""
    bundle, key = trained
    builds: list[Path] = []

    def build_engine(onnx: Path, engine: Path, *_: Any) -> None:
        builds.append(onnx)
        engine.write_bytes(b"plan")

    monkeypatch.setattr(trt, "require_tensorrt", lambda: Polygraphy("oom"))
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "10.0")
    monkeypatch.setattr(trt, "build_engine", build_engine)
    with pytest.raises(LocalStateError, match="the GPU has not the memory to run it"):
        _open_on_gpu(bundle, key, tmp_path)
    assert len(builds) == 1, "the cached engine was deleted and built again"
    (engine,) = (tmp_path / "e").iterdir()
    assert engine.read_bytes() == b"plan"


def test_an_engine_tensorrt_cannot_build_is_a_failed_precondition_and_a_full_disk_an_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = tmp_path / "model.onnx"
    monkeypatch.setattr(trt, "require_tensorrt", lambda: Polygraphy("parse"))
    with pytest.raises(FailedPrecondition, match=f"{onnx}: TensorRT cannot build a fp16 engine"):
        trt.build_engine(onnx, tmp_path / "x.plan", 24, 4, "fp16")
    monkeypatch.setattr(trt, "require_tensorrt", lambda: Polygraphy("save"))
    with pytest.raises(OSError, match="No space left"):
        trt.build_engine(onnx, tmp_path / "x.plan", 24, 4, "fp16")
