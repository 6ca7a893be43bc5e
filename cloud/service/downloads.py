"""Artifact downloads held to what the plane can afford: a few at once per device, a bounded
number of bytes handed to gRPC across the plane, and nothing kept once a call ends.

A download holds the chunk it is writing (its bytes in Python and again in gRPC core: two to
three times the chunk size) until the device takes it. A device that opened downloads and
never read them made the plane hold 12-16 MiB for each (1,737 MiB for 100 of one 8 MiB
artifact), and its open artifact file until a garbage collection happened to close the
cancelled handler's generator. Now:

- a device has at most DOWNLOADS_PER_DEVICE open at once (its agent downloads one file at a
  time); one more is refused, before any query, with RESOURCE_EXHAUSTED;
- each download reserves its chunk size of DOWNLOAD_BYTES_IN_FLIGHT before its first chunk
  is read; one that finds no room waits its turn (first come, first served);
- a download whose device took nothing for DOWNLOAD_STALL_S (longer for a chunk a slow link
  takes longer over, SLOWEST_LINK_BYTES_S) is ended (UNAVAILABLE: the agent
  resumes from what it has), so unread downloads cannot keep the room from the others;
- each chunk is read in a thread from a file opened and closed for it, and what a download
  holds is given back by the call's done callback, the moment the call ends, cancelled or
  not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud.artifacts import ArtifactStore
from cloud.service.ended_calls import cut
from edge_agent.errors import IntegrityError, RateLimited, Unavailable
from protos.autoglm.v1 import agent_pb2

log = logging.getLogger(__name__)

DOWNLOADS_PER_DEVICE = 4
DOWNLOAD_BYTES_IN_FLIGHT = 128 << 20  # reserved: chunk sizes; held: about 2-3 times as much
DOWNLOAD_STALL_S = 300.0  # the least a download may take nothing for before it is ended
# ... or as long as its chunk takes at this rate, whichever is longer: a chunk is progress only
# once handed over whole, and a 1 MiB chunk over a 28 kbit/s link takes over 300 s.
SLOWEST_LINK_BYTES_S = 1024.0
PER_DEVICE_RETRY_S = 10.0


@dataclass(eq=False)
class Download:
    """One download's claim on the plane: counted for its device from `open` to `release`."""

    device_id: str
    reserved: int = 0  # bytes of the plane's budget it holds
    progress_at: float | None = None  # when it last handed a chunk over (None: not started)
    released: bool = False
    waiting: asyncio.Future[None] | None = field(default=None, repr=False)


class DownloadSlots:
    """The downloads open on this replica, per device and in bytes (event loop only)."""

    def __init__(
        self,
        per_device: int = DOWNLOADS_PER_DEVICE,
        bytes_in_flight: int = DOWNLOAD_BYTES_IN_FLIGHT,
        stall_s: float = DOWNLOAD_STALL_S,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.per_device = per_device
        self.bytes_in_flight = bytes_in_flight
        self.stall_s = stall_s
        self.slowest_link_bytes_s = SLOWEST_LINK_BYTES_S
        self.clock = clock
        self.by_device: dict[str, int] = {}
        self.reserved = 0
        self._queue: deque[tuple[Download, int]] = deque()
        self._background: set[asyncio.Task[None]] = set()
        self.refused = Counter(
            "autoglm_downloads_refused",
            f"Artifact downloads refused: the device had {per_device} open already.",
            registry=registry,
        )
        self.stalled = Counter(
            "autoglm_downloads_stalled",
            "Artifact downloads ended because the device took nothing for a while.",
            registry=registry,
        )
        Gauge(
            "autoglm_downloads_open", "Artifact downloads open now.", registry=registry
        ).set_function(lambda: self.open)
        Gauge(
            "autoglm_downloads_waiting",
            "Artifact downloads waiting for room in the plane's bytes in flight.",
            registry=registry,
        ).set_function(lambda: len(self._queue))

    @property
    def open(self) -> int:
        return sum(self.by_device.values())

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def open_for(self, device_id: str) -> Download:
        """Counts a download of `device_id`; RateLimited when it has `per_device` open."""
        count = self.by_device.get(device_id, 0)
        if count >= self.per_device:
            self.refused.inc()
            raise RateLimited(
                f"device {device_id} has {count} artifact downloads open, the most one device "
                f"may have at once (the control plane is not busy: an agent asks for its files "
                f"one at a time); try again in {PER_DEVICE_RETRY_S:.0f} s",
                retry_after_s=PER_DEVICE_RETRY_S,
            )
        self.by_device[device_id] = count + 1
        return Download(device_id)

    async def admit(self, download: Download, nbytes: int) -> None:
        """Reserves `nbytes` of the plane's budget for `download`, waiting behind those that
        came first when there is no room."""
        if not self._queue and self.reserved + nbytes <= self.bytes_in_flight:
            self._reserve(download, nbytes)
            return
        download.waiting = asyncio.get_running_loop().create_future()
        self._queue.append((download, nbytes))
        try:
            await download.waiting
        finally:
            download.waiting = None

    def release(self, download: Download) -> None:
        """Gives back what `download` holds (once; its call ended, however)."""
        if download.released:
            return
        download.released = True
        if download.waiting is not None and not download.waiting.done():
            download.waiting.cancel()
        count = self.by_device.pop(download.device_id, 0) - 1
        if count > 0:
            self.by_device[download.device_id] = count
        self.reserved -= download.reserved
        download.reserved = 0
        self._admit_waiting()

    def progressed(self, download: Download) -> None:
        """`download` handed a chunk over (or is about to start)."""
        download.progress_at = self.clock()

    def stall_limit(self, download: Download) -> float:
        """How long `download` may hand nothing over: `stall_s`, or its chunk's time at the
        slowest link served, whichever is longer."""
        return max(self.stall_s, download.reserved / self.slowest_link_bytes_s)

    def watch(
        self, download: Download, context: aio.ServicerContext[Any, Any], call: asyncio.Task[Any]
    ) -> None:
        """Ends `call` once `download` has handed nothing over for `stall_s`."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if download.released or download.progress_at is None:
                return
            idle = self.clock() - download.progress_at
            limit = self.stall_limit(download)
            if idle < limit:
                loop.call_later(limit - idle, check)
                return
            self.stalled.inc()
            log.info(
                "download by device %s ended: nothing taken for %.0f s", download.device_id, idle
            )
            error = Unavailable(
                f"the download took no data for {idle:.0f} s and was ended; resume it"
            )
            cut(context, call, error, self._background)
            self.release(download)

        loop.call_later(self.stall_s, check)

    def _reserve(self, download: Download, nbytes: int) -> None:
        download.reserved += nbytes
        self.reserved += nbytes

    def _admit_waiting(self) -> None:
        while self._queue:
            download, nbytes = self._queue[0]
            waiting = download.waiting
            if download.released or waiting is None or waiting.done():
                self._queue.popleft()  # its call ended while it waited
                continue
            if self.reserved + nbytes > self.bytes_in_flight:
                return
            self._queue.popleft()
            self._reserve(download, nbytes)
            waiting.set_result(None)


def read_chunk(
    artifacts: ArtifactStore, digest: str, offset: int, size: int, total: int
) -> agent_pb2.ArtifactChunk:
    """The chunk of `size` bytes at `offset` (in a thread: the file is open only meanwhile);
    IntegrityError when the artifact is shorter than it said."""
    blocks = artifacts.read(digest, offset, size)
    try:
        block = next(blocks, b"")
    finally:
        close = getattr(blocks, "close", None)  # a generator: its file closes now
        if close is not None:
            close()
    if len(block) != size:
        raise IntegrityError(
            f"artifact {digest[:23]}… ends at {offset + len(block)} bytes; it was {total} "
            "when the download began"
        )
    return agent_pb2.ArtifactChunk(offset=offset, data=block, total_size=total)
