"""Artifact downloads over real mutual TLS: resumed after the network drops half way,
refused when the bytes are not the ones asked for."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from edge_agent.download import Downloader
from edge_agent.enroll import channel_options
from edge_agent.errors import IntegrityError, NotFound
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.cloud import RunningPlane
from tests.support.proxy import CuttingProxy

pytestmark = pytest.mark.integration
SIZE = 6 * (1 << 20) + 12345  # not a whole number of chunks


def stored(plane: RunningPlane, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    plane.plane.artifacts.write(digest, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    return digest


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
    digest = stored(plane, data)
    host, port = plane.device_address.rsplit(":", 1)
    proxy = CuttingProxy((host, int(port)))
    try:
        proxy.cut_after(SIZE // 2)
        dl = downloader(identity, f"{host}:{proxy.port}")
        dest = tmp_path / "files" / "model.onnx"
        asyncio.run(dl.fetch([(digest, dest)]))
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert dest.read_bytes() == data
    assert not dest.with_name("model.onnx.part").exists()
    # Every byte arrived once: the second attempt asked only for the rest.
    assert dl.received_bytes == SIZE
    # On the wire: the file once plus what was in flight at the cut; starting over would
    # have sent the first half twice (1.5x).
    assert proxy.downstream_bytes < SIZE * 1.4


def test_a_tampered_artifact_is_refused_and_its_bytes_deleted(
    plane: RunningPlane, identity: DeviceIdentity, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20)
    digest = stored(plane, data)
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
    with pytest.raises(NotFound, match="not in the store"):
        asyncio.run(dl.fetch([(missing, tmp_path / "x.onnx")]))
    assert not (tmp_path / "x.onnx.part").exists() or (tmp_path / "x.onnx.part").stat().st_size == 0
