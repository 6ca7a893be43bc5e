"""A model install that meets a full (or read-only) disk is reported, frees what it took, and
is tried again until space returns: at the slot's preparation, mid-download and at the
pointer switch. A file the disk has no room for is not started.

The full disk is a stand-in (ENOSPC raised where the real one arises: the part's write, the
slot pointer's replace); mounting a small file system needs privileges CI may not have. The
control plane is a stub serving the trained bundle's bytes by digest."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import slots, updates
from edge_agent.bundle import MANIFEST, SIGNATURE
from edge_agent.config import ModelChoice
from edge_agent.download import CHUNK, DISK_RESERVE, Downloader, PartFile
from edge_agent.errors import DiskFull, LocalStateError, ReadOnlyDisk
from edge_agent.files import write_failure
from edge_agent.retry import Backoff
from edge_agent.slots import ModelSlots
from edge_agent.updates import OUTCOME, ModelUpdater
from protos.autoglm.v1 import agent_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WAIT_S = 30.0  # generous: only a broken install waits this long


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Stub:
    """The control plane's DownloadArtifact over the given blobs, in 1 MiB chunks."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[tuple[str, int]] = []

    def DownloadArtifact(self, request: Any) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        self.requests.append((request.digest, request.offset))
        data = self.blobs[request.digest]

        async def chunks() -> AsyncIterator[agent_pb2.ArtifactChunk]:
            for offset in range(request.offset, len(data), CHUNK):
                block = data[offset : offset + CHUNK]
                yield agent_pb2.ArtifactChunk(offset=offset, data=block, total_size=len(data))

        return chunks()


class Disk:
    """Whether the state directory's disk is full now; its free bytes as the agent sees them."""

    def __init__(self) -> None:
        self.full = False

    def free(self, _: Path) -> int:
        return 0 if self.full else 1 << 40


class StubDownloader(Downloader):
    def __init__(self, stub: Stub, disk: Disk) -> None:
        super().__init__("stub", None, [], Backoff(0.01, 0.02), 2, free=disk.free)  # type: ignore[arg-type]
        self.stub = stub

    async def fetch(self, files: list[tuple[str, Path]]) -> None:
        await self.fetch_from(self.stub, files)  # type: ignore[arg-type]


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """ENOSPC from the part's writes and the slot files' replaces while `full`."""
    state = Disk()
    real_write = PartFile._write
    real_replace = slots.replace_atomically

    def write(self: PartFile, block: bytes) -> None:
        if state.full:
            self._fh.write(block[: len(block) // 2])  # what fit before the disk filled
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, block)

    def replace(path: Path, data: bytes, mode: int) -> None:
        if state.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(path, data, mode)

    monkeypatch.setattr(PartFile, "_write", write)
    monkeypatch.setattr(slots, "replace_atomically", replace)
    yield state


# ---- the downloader alone ----


def test_a_write_that_meets_a_full_disk_says_so_and_keeps_no_part(
    tmp_path: Path, disk: Disk
) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256)
    stub = Stub({_digest(data): data})
    dest = tmp_path / "slot" / "model.onnx"
    disk.full = True
    with pytest.raises(LocalStateError, match=r"disk full: [0-9]+ bytes free at .*slot") as raised:
        asyncio.run(StubDownloader(stub, Disk()).fetch([(_digest(data), dest)]))
    assert "No space left on device" in str(raised.value)
    assert len(stub.requests) == 1, "a full disk is not retried by the downloader"
    assert list(dest.parent.iterdir()) == [], "the partial download keeps the disk full"


def test_a_file_the_disk_has_no_room_for_is_not_started(tmp_path: Path) -> None:
    data = b"x" * (2 * CHUNK + 5)
    stub = Stub({_digest(data): data})
    dest = tmp_path / "slot" / "model.onnx"
    free = len(data) + DISK_RESERVE - 1
    loader = StubDownloader(stub, Disk())
    loader.free = lambda _: free
    with pytest.raises(LocalStateError) as raised:
        asyncio.run(loader.fetch([(_digest(data), dest)]))
    assert str(raised.value).startswith(f"disk full: {free} bytes free at {dest.parent}")
    assert f"model.onnx needs {len(data)} more" in str(raised.value)
    assert list(dest.parent.iterdir()) == []
    loader.free = lambda _: free + 1  # just enough
    asyncio.run(loader.fetch([(_digest(data), dest)]))
    assert dest.read_bytes() == data


def test_write_failures_say_what_in_words(tmp_path: Path) -> None:
    full = write_failure(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert str(full).startswith("disk full: ") and f"bytes free at {tmp_path}" in str(full)
    read_only = write_failure(tmp_path, OSError(errno.EROFS, "Read-only file system"))
    assert str(read_only) == f"read-only file system at {tmp_path} (Read-only file system)"
    other = write_failure(tmp_path / "x", OSError(errno.EACCES, "Permission denied"), "open")
    assert str(other) == f"cannot open {tmp_path / 'x'} (Permission denied)"


def test_write_failures_carry_the_cause_as_their_type(tmp_path: Path) -> None:
    """The retry's disk check branches on the error's type, not on its words."""
    full = write_failure(tmp_path, OSError(errno.EDQUOT, "Disk quota exceeded"))
    read_only = write_failure(tmp_path, OSError(errno.EROFS, "Read-only file system"))
    other = write_failure(tmp_path, OSError(errno.EIO, "Input/output error"))
    assert isinstance(full, DiskFull) and isinstance(read_only, ReadOnlyDisk), (full, read_only)
    assert type(other) is LocalStateError, type(other)
    for error in (full, read_only):
        assert (error.label, error.exit_code) == ("local state error", 9), error
    assert updates._disk_fault_check(other, tmp_path) is None
    assert updates._disk_fault_check(LocalStateError(str(full)), tmp_path) is None
    assert updates._disk_fault_check(full, tmp_path) is not None


# ---- the whole install ----


class FakeModel:
    def __init__(self, version: str) -> None:
        self.version = version
        self.closed = False
        self.choice = SimpleNamespace(label="fake")
        self.manifest = SimpleNamespace(name="pump")

    def close(self) -> None:
        self.closed = True


class FakeAgent:
    """What `ModelUpdater` uses of an agent; `_open` trusts the slot the updater verified."""

    def __init__(self, root: Path, key: Any) -> None:
        self.model: FakeModel | None = None
        self.slots = ModelSlots(root / "models")
        self.key = key
        self.config = SimpleNamespace(
            state_dir=root,
            model=ModelChoice(),
            shadow=SimpleNamespace(interval_s=3600.0),
            updates=SimpleNamespace(retry_initial_s=0.01, retry_max_s=0.02, download_attempts=2),
        )
        self.reports: list[agent_pb2.InstallReport] = []
        self.reported = asyncio.Event()
        self.session = SimpleNamespace(
            post=self._post, address="stub", credentials=lambda: None, tls_server_name=""
        )
        self.opened: list[FakeModel] = []
        self.on_open: Callable[[], None] = lambda: None

    def _post(self, message: agent_pb2.AgentMessage) -> None:
        self.reports.append(message.install)
        self.reported.set()

    def _open(self, directory: Path, partial: bool) -> FakeModel:
        assert partial and (directory / MANIFEST).is_file()
        self.on_open()
        model = FakeModel("1")
        self.opened.append(model)
        return model

    async def swap(self, model: FakeModel) -> None:
        self.model = model

    async def report(self, count: int) -> agent_pb2.InstallReport:
        """The `count`th report, waited for."""

        async def arrived() -> None:
            while len(self.reports) < count:
                self.reported.clear()
                await self.reported.wait()

        try:
            await asyncio.wait_for(arrived(), WAIT_S)
        except TimeoutError:
            raise AssertionError(
                f"report {count} not posted in {WAIT_S}s: {self.reports}"
            ) from None
        return self.reports[count - 1]


def _served(bundle: Path) -> tuple[dict[str, bytes], agent_pb2.DesiredState]:
    blobs = {_digest(p.read_bytes()): p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    desired = agent_pb2.DesiredState(
        model_name="pump",
        model_version="1",
        manifest_digest=_digest((bundle / MANIFEST).read_bytes()),
        signature_digest=_digest((bundle / SIGNATURE).read_bytes()),
        rollout_id="r1",
    )
    return blobs, desired


async def _install(
    agent: FakeAgent, stub: Stub, disk: Disk, desired: agent_pb2.DesiredState, fill: str
) -> tuple[agent_pb2.InstallReport, agent_pb2.InstallReport, int]:
    """Installs `desired` with the disk full at `fill`; frees it once the first report came
    and the install was tried twice more. Returns the first two reports and how many came."""
    updater = ModelUpdater(agent)  # type: ignore[arg-type]
    updater.downloader = StubDownloader(stub, disk)
    applies = 0
    tried = asyncio.Event()
    apply = updater.apply

    async def counted(d: agent_pb2.DesiredState) -> None:
        nonlocal applies
        applies += 1
        await apply(d)
        tried.set()

    updater.apply = counted  # type: ignore[method-assign]
    if fill == "prepare":
        disk.full = True
    elif fill == "activate":
        agent.on_open = lambda: setattr(disk, "full", True)
    stop = asyncio.Event()
    task = asyncio.create_task(updater.run(stop))
    try:
        updater.want(desired)
        first = await agent.report(1)
        try:  # tried again on the full disk, without a second report
            async with asyncio.timeout(WAIT_S):
                while applies < 3:
                    tried.clear()
                    await tried.wait()
        except TimeoutError:
            raise AssertionError(f"not tried again: {applies} attempts in {WAIT_S}s") from None
        agent.on_open = lambda: None
        disk.full = False
        second = await agent.report(2)
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return first, second, len(agent.reports)


@pytest.mark.parametrize("fill", ["prepare", "download", "activate"])
def test_an_install_on_a_full_disk_is_reported_and_done_once_space_returns(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    fill: str,
) -> None:
    bundle, key = trained
    monkeypatch.setattr(updates, "RETRY_DEFERRED_S", 0.05)
    blobs, desired = _served(bundle)
    stub = Stub(blobs)
    agent = FakeAgent(tmp_path / "state", key.public_key())
    if fill == "download":  # the manifest arrives, the model file meets the full disk
        real = PartFile._write
        filled: list[Path] = []

        def fill_at_onnx(self: PartFile, block: bytes) -> None:
            if not filled and self.path.name.endswith(".onnx.part"):
                filled.append(self.path)
                disk.full = True
            real(self, block)

        monkeypatch.setattr(PartFile, "_write", fill_at_onnx)
    first, second, reports = asyncio.run(_install(agent, stub, disk, desired, fill))

    assert first.outcome == OUTCOME.OUTCOME_DOWNLOAD_FAILED, first
    assert first.model_version == "1" and first.rollout_id == "r1"
    assert first.detail.startswith("disk full: "), first.detail
    assert "bytes free at" in first.detail and "tried again in" in first.detail
    assert first.retrying, "the control plane must see the disk, not the model, failed"
    assert second.outcome == OUTCOME.OUTCOME_INSTALLED, second
    assert not second.retrying
    assert reports == 2, "a blocked install is reported once, not at every retry"
    assert agent.model is not None and agent.model.version == "1"
    assert agent.slots.read().active is not None
    slot = agent.slots.slot_dir(agent.slots.read().active.slot)  # type: ignore[union-attr]
    assert not list(slot.glob("*.part")), "partial downloads left behind"
    # Every model opened but not served was closed (the one refused by the pointer's write).
    assert all(m.closed for m in agent.opened if m is not agent.model)


def test_an_install_slot_is_made_durably_and_its_parts_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inodes: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        real(fd)

    models = ModelSlots(tmp_path / "models")
    monkeypatch.setattr(os, "fsync", fsync)
    directory = models.prepare("a", "sha256:x")
    assert (tmp_path / "models").stat().st_ino in inodes, "the slot's folder entry is not synced"
    assert directory.stat().st_ino in inodes
    (directory / "model.onnx.part").write_bytes(b"12345")
    (directory / "golden.npz").write_bytes(b"kept")
    inodes.clear()
    assert models.drop_parts("a") == 5
    assert sorted(p.name for p in directory.iterdir()) == [".target", "golden.npz"]
    assert directory.stat().st_ino in inodes, "the parts' removal is not synced"


# ---- a model that cannot start for the device's reason, not its own ----

DISK_FULL = "disk full: 0 bytes free at /state/engines (No space left on device)"


def test_a_full_disk_at_start_does_not_fail_the_versions_for_good(tmp_path: Path) -> None:
    """Both slots fail to open on a full disk: no version is remembered as failed, the
    report says the agent retries, and once space returns the version is installed again
    instead of being refused as "failed before"."""
    from edge_agent.agent import Agent
    from edge_agent.slots import SlotInfo

    agent = FakeAgent(tmp_path / "state", None)
    agent.slots.activate(SlotInfo("a", "pump", "1", "sha256:aaa"))
    agent.slots.activate(SlotInfo("b", "pump", "2", "sha256:bbb", "r1"))

    def full(directory: Path, partial: bool) -> FakeModel:
        raise DiskFull(DISK_FULL)

    starting = SimpleNamespace(
        slots=agent.slots,
        _open=full,
        pending_reports=[],
        config=SimpleNamespace(model=SimpleNamespace(bundle=None)),
    )
    assert Agent._open_at_start(starting) is None  # type: ignore[arg-type]
    assert agent.slots.read().failed == {}, "the disk's failure is held against the versions"
    reports = [m.install for m in starting.pending_reports]
    assert [(r.model_version, r.retrying) for r in reports] == [("2", True), ("1", True)]
    assert all(r.outcome == OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK for r in reports)

    updater = ModelUpdater(agent)  # type: ignore[arg-type]
    installed: list[str] = []

    async def install(d: agent_pb2.DesiredState) -> tuple[FakeModel, SlotInfo]:
        installed.append(d.model_version)
        return FakeModel(d.model_version), SlotInfo("b", "pump", "2", d.manifest_digest)

    updater._install = install  # type: ignore[method-assign]
    desired = agent_pb2.DesiredState(
        model_name="pump", model_version="2", manifest_digest="sha256:bbb", rollout_id="r1"
    )
    asyncio.run(updater.apply(desired))
    assert installed == ["2"], f"not installed again: {agent.reports}"
    assert agent.reports[-1].outcome == OUTCOME.OUTCOME_INSTALLED, agent.reports[-1]
    assert agent.model is not None and agent.model.version == "2"


def test_a_swap_that_fails_on_the_device_is_retried_not_failed(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The data path cannot start the new model for lack of disk (or GPU memory): the
    version is not remembered as failed, the report says the agent retries, and it does."""
    bundle, key = trained
    monkeypatch.setattr(updates, "RETRY_DEFERRED_S", 0.05)
    freed = iter(range(0, 1 << 40, 4096))  # space is freed on site meanwhile
    monkeypatch.setattr(updates.hostfacts, "disk_free_bytes", lambda _: next(freed))
    blobs, desired = _served(bundle)
    agent = FakeAgent(tmp_path / "state", key.public_key())
    swaps: list[FakeModel] = []
    real_swap = agent.swap

    async def swap(model: FakeModel) -> None:
        swaps.append(model)
        if len(swaps) == 1:
            raise DiskFull(DISK_FULL)
        await real_swap(model)

    agent.swap = swap  # type: ignore[method-assign]

    async def run() -> None:
        updater = ModelUpdater(agent)  # type: ignore[arg-type]
        updater.downloader = StubDownloader(Stub(blobs), Disk())
        stop = asyncio.Event()
        task = asyncio.create_task(updater.run(stop))
        try:
            updater.want(desired)
            await agent.report(2)
        finally:
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    first, second = agent.reports[:2]
    assert first.outcome == OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, first
    assert first.retrying and first.detail.startswith(DISK_FULL), first
    assert agent.slots.failure(desired.manifest_digest) is None
    assert second.outcome == OUTCOME.OUTCOME_INSTALLED, second
    assert agent.model is not None and len(swaps) == 2


def _swap_failing(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
    error: Callable[[], Exception],
    reports: int,
    tries: int = 0,
) -> tuple[FakeAgent, list[FakeModel], list[float]]:
    """The desired version served, its every swap failing with `error()`; returns the agent,
    the swaps tried, and the delays the updater asked for before each next try."""
    bundle, key = trained
    monkeypatch.setattr(updates, "RETRY_DEFERRED_S", 0.001)
    monkeypatch.setattr(updates, "RETRY_LOCAL_MAX_S", 0.004)
    blobs, desired = _served(bundle)
    agent = FakeAgent(tmp_path / "state", key.public_key())
    swaps: list[FakeModel] = []
    delays: list[float] = []
    tried = asyncio.Event()

    async def swap(model: FakeModel) -> None:
        swaps.append(model)
        if len(swaps) >= tries:
            tried.set()
        raise error()

    agent.swap = swap  # type: ignore[method-assign]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        real_later = loop.call_later

        def call_later(delay: float, callback: Any, *args: Any) -> Any:
            if callback.__name__ == "_retry":
                delays.append(delay)
            return real_later(delay, callback, *args)

        loop.call_later = call_later  # type: ignore[method-assign]
        updater = ModelUpdater(agent)  # type: ignore[arg-type]
        updater.downloader = StubDownloader(Stub(blobs), Disk())
        stop = asyncio.Event()
        task = asyncio.create_task(updater.run(stop))
        try:
            updater.want(desired)
            await agent.report(reports)
            await asyncio.wait_for(tried.wait(), WAIT_S)
        finally:
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    return agent, swaps, delays


def test_a_swap_the_gpu_has_no_memory_for_fails_the_version_after_a_few_tries(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine that never fits beside the serving model is not tried forever as the
    device's fault: after GPU_MEMORY_TRIES it is failed (not retrying) and remembered, so
    the rollout counts it; the delays between tries double up to the cap."""
    from edge_agent.inference.tensorrt import GpuOutOfMemory

    agent, swaps, delays = _swap_failing(
        tmp_path, trained, monkeypatch, lambda: GpuOutOfMemory("x.plan: out of memory"), 2
    )
    first, last = agent.reports[:2]
    assert first.retrying and first.outcome == OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, first
    assert not last.retrying and last.outcome == OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, last
    assert "does not fit in GPU memory beside the serving model" in last.detail, last
    assert len(swaps) == updates.GPU_MEMORY_TRIES, swaps
    assert delays[: updates.GPU_MEMORY_TRIES - 1] == [0.001, 0.002, 0.004, 0.004], delays
    assert agent.slots.read().failed, "the version is not remembered as failed"


def test_a_swap_on_a_full_disk_is_tried_again_less_and_less_often(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk's fault keeps being tried (never failed), with a doubling delay up to the
    cap instead of every RETRY_DEFERRED_S."""
    agent, _, delays = _swap_failing(
        tmp_path, trained, monkeypatch, lambda: LocalStateError("cannot write x (EIO)"), 1, 5
    )
    assert agent.reports[0].retrying, agent.reports[0]
    assert agent.slots.read().failed == {}
    assert delays[:4] == [0.001, 0.002, 0.004, 0.004], delays


def test_a_swap_is_not_tried_again_while_the_disk_is_still_full(
    tmp_path: Path,
    trained: tuple[Path, Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each swap stops the serving data path: while the free space is no more than at the
    failure, the retry only reschedules; once space returns the swap is tried again."""
    free = [1000]
    monkeypatch.setattr(updates.hostfacts, "disk_free_bytes", lambda _: free[0])
    checks: list[int] = []
    real_retry = ModelUpdater._retry

    def retry(self: ModelUpdater, d: agent_pb2.DesiredState) -> None:
        checks.append(len(swaps))
        if len(checks) == 4:
            free[0] = 5000  # space freed on site
        real_retry(self, d)

    monkeypatch.setattr(ModelUpdater, "_retry", retry)
    swaps: list[int] = []

    def error() -> Exception:
        swaps.append(1)
        return DiskFull(DISK_FULL)

    _, tried, _ = _swap_failing(tmp_path, trained, monkeypatch, error, 1, 2)
    assert checks[:4] == [1, 1, 1, 1], f"swapped again while the disk was full: {checks}"
    assert len(tried) >= 2, tried
