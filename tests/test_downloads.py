"""Artifact downloads over real mutual TLS: resumed after the network drops half way,
refused when the bytes are not the ones asked for."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest

from cloud.domain import DesiredModel, ModelRecord, PresenceUpdate
from edge_agent.download import CHUNK, Downloader
from edge_agent.enroll import channel_options
from edge_agent.errors import IntegrityError, NotFound, PermissionDenied
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.cloud import RunningPlane
from tests.support.proxy import CuttingProxy

pytestmark = pytest.mark.integration
SIZE = 6 * (1 << 20) + 12345  # not a whole number of chunks


def stored(plane: RunningPlane, data: bytes, identity: DeviceIdentity) -> str:
    """`data` in the artifact store, assigned to the device (a devices may download only the
    files of model versions assigned to it)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    plane.plane.artifacts.write(digest, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    assign(plane, digest, identity)
    return digest


def assign(plane: RunningPlane, digest: str, identity: DeviceIdentity) -> None:
    now = dt.datetime.now(dt.UTC)
    store = plane.plane.store
    version = digest[7:19]
    store.add_model(ModelRecord("dl", version, digest, digest, 0, now, {}))
    store.set_desired(
        [DesiredModel(identity.info.device_id, "dl", version, digest, digest, "", False, now)]
    )


def downloader(identity: DeviceIdentity, address: str, attempts: int = 4) -> Downloader:
    return Downloader(
        address,
        identity.credentials(),
        channel_options(identity.info.tls_server_name),
        Backoff(0.05, 0.2),
        attempts,
    )


@pytest.fixture
def identity(plane: RunningPlane, tmp_path: Path) -> DeviceIdentity:
    return enroll_identity(register(plane, "pump-dl", site="a"), tmp_path / "agent")


def test_a_download_cut_half_way_resumes_from_where_it_stopped(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    digest = stored(plane, data, identity)
    host, port = plane.device_address.rsplit(":", 1)
    proxy = CuttingProxy((host, int(port)))
    dest = tmp_path / "files" / "model.onnx"
    part = dest.with_name("model.onnx.part")
    dl = downloader(identity, f"{host}:{proxy.port}")
    # The network stops after half the file, and drops once the agent has at least two
    # chunks on disk: how much of the forwarded half reached the agent before a drop depends
    # on the machine's speed (on a loaded one, none of it), the resume must not.
    proxy.hold_after(SIZE // 2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            fetching = pool.submit(asyncio.run, dl.fetch([(digest, dest)]))
            assert proxy.held.wait(120), "the proxy never forwarded half the file"
            persisted = wait_for_size(part, 2 * CHUNK, fetching)
            first = proxy.downstream_bytes
            proxy.cut()
            fetching.result(timeout=300)
        finally:
            proxy.close()
    assert proxy.cuts == 1
    assert dest.read_bytes() == data
    assert not part.exists()
    # Every byte arrived once: the second attempt asked only for the rest.
    assert dl.received_bytes == SIZE
    # On the wire after the drop: the rest of the file and framing; starting over would have
    # sent the whole file again.
    second = proxy.downstream_bytes - first
    bound = (SIZE - persisted) * 1.05 + 65536
    assert second < bound, (
        f"{second} bytes after the drop for {SIZE - persisted} missing ({persisted} on disk)"
    )


def wait_for_size(path: Path, size: int, fetching: concurrent.futures.Future[None]) -> int:
    """The size of `path` once it is at least `size` (the download still running)."""
    deadline = time.monotonic() + 120
    while (now := path.stat().st_size if path.exists() else 0) < size:
        assert not fetching.done(), f"the download ended with {now} bytes in {path.name}"
        assert time.monotonic() < deadline, f"{path.name} held {now} bytes after 120 s"
        time.sleep(0.02)
    return now


def test_a_tampered_artifact_is_refused_and_its_bytes_deleted(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20)
    digest = stored(plane, data, identity)
    # Changed at rest in the store after it was accepted (a bad disk, or an attacker).
    path = plane.plane.artifacts.path(digest)  # type: ignore[attr-defined]
    tampered = bytearray(data)
    tampered[4096] ^= 0xFF
    path.write_bytes(bytes(tampered))
    dl = downloader(identity, plane.device_address, attempts=2)
    dest = tmp_path / "files" / "model.onnx"
    with pytest.raises(IntegrityError, match="expected sha256:"):
        asyncio.run(dl.fetch([(digest, dest)]))
    assert not dest.exists()
    assert not dest.with_name("model.onnx.part").exists()
    assert dl.received_bytes == 2 * len(data)  # each attempt started over


def test_an_unknown_artifact_is_a_clear_error(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    dl = downloader(identity, plane.device_address)
    missing = "sha256:" + "0" * 64
    assign(plane, missing, identity)  # assigned, but its bytes are not there
    with pytest.raises(NotFound, match="not in the store"):
        asyncio.run(dl.fetch([(missing, tmp_path / "x.onnx")]))
    assert not (tmp_path / "x.onnx.part").exists() or (tmp_path / "x.onnx.part").stat().st_size == 0


def test_a_device_downloads_only_artifacts_of_versions_assigned_to_it(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    other = enroll_identity(register(plane, "pump-other", site="a"), tmp_path / "other")
    theirs = stored(plane, os.urandom(1 << 16), other)
    # Saying it serves that model grants nothing: only what the control plane assigned does.
    version = theirs[7:19]
    plane.plane.store.record_presence(
        [PresenceUpdate(identity.info.device_id, dt.datetime.now(dt.UTC), True,
                        status={"model_name": "dl", "model_version": version})]
    )  # fmt: skip
    dl = downloader(identity, plane.device_address, attempts=1)
    with pytest.raises(PermissionDenied, match="not part of a model version assigned"):
        asyncio.run(dl.fetch([(theirs, tmp_path / "theirs.onnx")]))
    assert not (tmp_path / "theirs.onnx").exists()


def test_tiny_chunks_are_refused(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    digest = stored(plane, os.urandom(1 << 16), identity)
    stub = agent_pb2_grpc.AgentServiceStub(
        grpc.secure_channel(
            plane.device_address,
            identity.credentials(),
            channel_options(identity.info.tls_server_name),
        )
    )
    request = agent_pb2.DownloadArtifactRequest(digest=digest, chunk_size=1)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.DownloadArtifact(request, timeout=20))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk_size: 1 bytes" in (refused.value.details() or "")
