"""Artifact downloads a device opens and does not read, over real mutual TLS: a few at once
per device (the rest refused), a bounded number of bytes across the plane (the rest wait their
turn), no artifact file held open while gRPC writes, and all of it given back the moment a
call ends, without waiting for a garbage collection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.service.downloads import (
    DOWNLOAD_STALL_S,
    DOWNLOADS_PER_DEVICE,
    SLOWEST_LINK_BYTES_S,
    Download,
    DownloadSlots,
)
from edge_agent.errors import RateLimited, from_rpc_error
from edge_agent.identity import DeviceIdentity
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import register
from tests.support.agents import enroll_identity, wait_for
from tests.support.cloud import RunningPlane
from tests.test_downloads import downloader, stored

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture
def no_collection() -> Iterator[None]:
    """No garbage collection during the test: what is given back, is given back at once."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _device(plane: RunningPlane, tmp_path: Path, name: str) -> DeviceIdentity:
    return enroll_identity(register(plane, name, site="a"), tmp_path / name)


def _channel(plane: RunningPlane, identity: DeviceIdentity) -> grpc.Channel:
    return grpc.secure_channel(
        plane.device_address, identity.credentials(), options=[("grpc.http2.bdp_probe", 0)]
    )


def _unread(channel: grpc.Channel, digest: str, n: int) -> list[grpc.Future]:
    """`n` downloads of `digest` in 1 MiB chunks that nobody reads."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.DownloadArtifactRequest(digest=digest, chunk_size=MIB)
    return [stub.DownloadArtifact(request, timeout=120) for _ in range(n)]


def _open_artifact_files(plane: RunningPlane) -> int:
    """Files of the plane's artifact store open in this process (the plane runs here)."""
    root = str(plane.plane.artifacts.root)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(root)
        except OSError:
            continue  # closed meanwhile
    return count


def _fetch(identity: DeviceIdentity, address: str, digest: str, dest: Path) -> None:
    asyncio.run(downloader(identity, address).fetch([(digest, dest)]))


def test_a_device_holds_a_few_downloads_no_file_and_nothing_once_they_end(
    plane: RunningPlane, tmp_path: Path, no_collection: None
) -> None:
    identity = _device(plane, tmp_path, "pump-dl")
    data = os.urandom(4 * MIB)
    digest = stored(plane, data, identity)
    slots = plane.plane.downloads
    with _channel(plane, identity) as channel:
        calls = _unread(channel, digest, 10)
        wait_for(lambda: sum(c.done() for c in calls) >= 10 - DOWNLOADS_PER_DEVICE, timeout=30)
        refused = [c for c in calls if c.done()]
        held = [c for c in calls if not c.done()]
        assert len(held) == DOWNLOADS_PER_DEVICE, [c.code() for c in refused]
        assert slots.by_device == {identity.info.device_id: DOWNLOADS_PER_DEVICE}
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
            error = from_rpc_error(call, plane.device_address)  # type: ignore[arg-type]
            assert isinstance(error, RateLimited) and error.retry_after_s > 0, error
            assert "not busy" in str(error) and "downloads open" in str(error), error
        for call in held:  # each has read its first chunk and waits to hand over the second
            assert next(call).offset == 0
        # While gRPC waits for the device to take a chunk, no artifact file is open.
        wait_for(lambda: _open_artifact_files(plane) == 0, timeout=30)
        for call in held:
            call.cancel()
        wait_for(lambda: slots.open == 0, timeout=30)
        assert slots.reserved == 0 and slots.by_device == {}
    assert _open_artifact_files(plane) == 0
    # The device is not held back by the downloads it left: a real one succeeds.
    dest = tmp_path / "files" / "model.onnx"
    _fetch(identity, plane.device_address, digest, dest)
    assert dest.read_bytes() == data
    assert slots.open == 0


def test_downloads_past_the_planes_bytes_in_flight_wait_their_turn(
    plane: RunningPlane, tmp_path: Path
) -> None:
    slots = plane.plane.downloads
    slots.bytes_in_flight = 2 * MIB  # two 1 MiB chunks
    first, second = _device(plane, tmp_path, "pump-a"), _device(plane, tmp_path, "pump-b")
    data = os.urandom(3 * MIB)
    digest = stored(plane, data, first)
    stored(plane, data, second)
    dest = tmp_path / "files" / "model.onnx"
    with (
        _channel(plane, first) as channel,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        calls = _unread(channel, digest, 2)
        wait_for(lambda: slots.reserved == 2 * MIB, timeout=30)
        fetching = pool.submit(_fetch, second, plane.device_address, digest, dest)
        wait_for(lambda: slots.waiting == 1, timeout=30)
        assert not fetching.done() and not any(c.done() for c in calls)
        for call in calls:
            call.cancel()
        fetching.result(timeout=60)  # its turn came when the room was given back
    assert dest.read_bytes() == data
    wait_for(lambda: slots.open == 0, timeout=30)
    assert slots.reserved == 0 and slots.waiting == 0


def test_a_download_whose_device_takes_nothing_is_ended_and_its_room_given_back(
    plane: RunningPlane, tmp_path: Path
) -> None:
    slots = plane.plane.downloads
    slots.stall_s = 0.5
    slots.slowest_link_bytes_s = 4 * MIB  # a 1 MiB chunk: 0.25 s, under stall_s
    identity = _device(plane, tmp_path, "pump-dl")
    digest = stored(plane, os.urandom(4 * MIB), identity)
    with _channel(plane, identity) as channel:
        (call,) = _unread(channel, digest, 1)
        stalled = "autoglm_downloads_stalled_total"
        wait_for(lambda: plane.plane.metrics.registry.get_sample_value(stalled) == 1, timeout=30)
        assert slots.open == 0 and slots.reserved == 0
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:  # the device reads at last: what was sent, then the end
                pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    assert "took no data" in (ended.value.details() or ""), ended.value.details()


def test_an_agent_refused_for_downloads_left_open_waits_and_downloads(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """Downloads a dropped link left open on the plane make it refuse the agent's next one
    (RESOURCE_EXHAUSTED with a retry hint): the agent waits the hint and tries again instead
    of failing the install."""
    identity = _device(plane, tmp_path, "pump-dl")
    data = os.urandom(2 * MIB)
    digest = stored(plane, data, identity)
    slots = plane.plane.downloads
    dest = tmp_path / "files" / "model.onnx"
    with (
        _channel(plane, identity) as channel,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        held = _unread(channel, digest, DOWNLOADS_PER_DEVICE)
        wait_for(lambda: slots.by_device.get(identity.info.device_id) == DOWNLOADS_PER_DEVICE)
        refused_before = _refused(slots)
        # One attempt only: refusals are not attempts (the plane may hold a dropped link's
        # calls for minutes), so it outlasts two of them.
        fetching = pool.submit(
            asyncio.run,
            downloader(identity, plane.device_address, attempts=1).fetch([(digest, dest)]),
        )
        wait_for(lambda: _refused(slots) >= refused_before + 2, timeout=120)
        assert not fetching.done(), fetching.exception()
        for call in held:  # the dropped link's calls end at last
            call.cancel()
        fetching.result(timeout=300)
    assert dest.read_bytes() == data


def _refused(slots: DownloadSlots) -> float:
    return slots.refused._value.get()  # type: ignore[attr-defined]  # prometheus_client's own


def test_a_chunk_a_slow_link_takes_longer_over_is_not_a_stall() -> None:
    """A chunk counts as progress only once handed over whole: the stall limit is at least
    the chunk's time at the slowest link served (1 MiB at 1 KiB/s: 1,024 s), so a download
    over a 28 kbit/s link is not cut before its first chunk, again and again."""
    slots = DownloadSlots()
    assert slots.stall_limit(Download("pump-1", reserved=MIB)) == MIB / SLOWEST_LINK_BYTES_S
    assert slots.stall_limit(Download("pump-1", reserved=16 << 10)) == DOWNLOAD_STALL_S
