"""Artifact downloads by digest over mutual TLS, resumed from where an interruption left off.

A file arrives as `<name>.part`; every retry asks the control plane for the bytes from the
part's current size on. The part is hashed as it is written and only renamed to its name,
after an fsync, when the sha256 matches the digest asked for; a mismatch deletes it (the
next attempt starts over). A disk that does not take the bytes (full, read-only) is not
retried here: the part is deleted, so it does not keep the disk full, and the caller gets a
`LocalStateError` that says so; a file the disk has no room for is not started.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from edge_agent.bundle import sha256_file
from edge_agent.errors import (
    AutoglmError,
    IntegrityError,
    LocalStateError,
    RateLimited,
    Unavailable,
    from_rpc_error,
)
from edge_agent.files import free_bytes, fsync_dir, make_dir_durably, remove_durably, write_failure
from edge_agent.retry import Backoff
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
CHUNK = 1 << 20
# A download the plane refused (this device has too many open: calls a dropped link left
# behind) is tried again after the plane's hints for this long, past the plane's limit on a
# download whose device takes nothing (cloud.service.downloads.DOWNLOAD_STALL_S, 300 s).
REFUSED_FOR_S = 330.0
# Left free on the state directory's disk after a download: the outbox, open alerts and
# calibrations must still be written while a model arrives.
DISK_RESERVE = 64 << 20
# Bulk transfers want big flow-control windows; the session channel turns BDP probing off
# (these replace the same keys in the options a Downloader is given).
DOWNLOAD_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.http2.bdp_probe", 1),
]


class PartFile:
    """`<name>.part` opened for appending, hashed as it grows.

    Writes and hashing run on one worker thread (both release the GIL), one block behind the
    network: the next chunk is received while the last is written. Written data is flushed
    to disk every `SYNC_EVERY` bytes, so the final fsync before the rename is short.
    """

    SYNC_EVERY = 16 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self._fh = path.open("ab+")
        self._fh.seek(0)
        while block := self._fh.read(CHUNK):  # resuming: the bytes already here
            self.hasher.update(block)
        self.size = self._fh.tell()
        self._unsynced = 0
        self._pending: asyncio.Future[None] | None = None

    def _write(self, block: bytes) -> None:
        self._fh.write(block)
        self.hasher.update(block)
        self._unsynced += len(block)
        if self._unsynced >= self.SYNC_EVERY:
            self._fh.flush()
            os.fdatasync(self._fh.fileno())
            self._unsynced = 0

    async def append(self, block: bytes) -> None:
        """Queues `block`; returns once the block before it is written."""
        await self.drain()
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._write, block)
        self.size += len(block)

    async def drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def close(self) -> None:
        """Waits for the last write, syncs and closes (also after an error)."""
        try:
            await self.drain()
        finally:
            await asyncio.to_thread(self._sync_and_close)

    def _sync_and_close(self) -> None:
        with self._fh:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def check_room(path: Path, needed: int, free: Callable[[Path], int] = free_bytes) -> None:
    """`LocalStateError` unless `needed` more bytes fit beside `DISK_RESERVE` at `path`."""
    available = free(path.parent)
    if needed + DISK_RESERVE > available:
        raise LocalStateError(
            f"disk full: {available} bytes free at {path.parent}, "
            f"{path.name.removesuffix('.part')} needs {needed} "
            f"more and {DISK_RESERVE} stay free for the data path"
        )


async def fetch_once(
    stub: agent_pb2_grpc.AgentServiceStub,
    digest: str,
    part: PartFile,
    chunk_size: int = CHUNK,
    free: Callable[[Path], int] = free_bytes,
) -> None:
    """Appends the artifact's missing bytes to `part`, asking for them from its size on;
    nothing is written when the size the first chunk announces does not fit on the disk."""
    offset = start = part.size
    request = agent_pb2.DownloadArtifactRequest(digest=digest, offset=offset, chunk_size=chunk_size)
    async for chunk in stub.DownloadArtifact(request):  # type: ignore[attr-defined]
        if chunk.offset != offset:
            raise IntegrityError(f"{digest}: chunk at offset {chunk.offset}, expected {offset}")
        if offset == start and chunk.total_size > start:
            await asyncio.to_thread(check_room, part.path, chunk.total_size - start, free)
        await part.append(chunk.data)
        offset += len(chunk.data)


class Downloader:
    """Fetches artifacts on its own channel (bulk traffic stays off the session stream)."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials,
        options: list[tuple[str, Any]],
        backoff: Backoff,
        attempts: int = 6,
        free: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.address = address
        self.credentials = credentials
        ours = {key for key, _ in DOWNLOAD_OPTIONS}
        self.options = [o for o in options if o[0] not in ours] + DOWNLOAD_OPTIONS
        self.backoff = backoff
        self.attempts = attempts
        self.free = free  # the free bytes at a folder (a stand-in in tests)
        self.received_bytes = 0  # over the downloader's life, resumed attempts included

    async def fetch(self, files: list[tuple[str, Path]]) -> None:
        """Downloads (digest, destination) pairs that are not there yet, verifying each; one
        that is there with other bytes (damaged since) is downloaded again.

        Raises `LocalStateError` when the disk does not take them (the part deleted)."""
        async with aio.secure_channel(self.address, self.credentials, options=self.options) as ch:
            await self.fetch_from(agent_pb2_grpc.AgentServiceStub(ch), files)

    async def fetch_from(
        self, stub: agent_pb2_grpc.AgentServiceStub, files: list[tuple[str, Path]]
    ) -> None:
        """`fetch` over a stub already connected."""
        for digest, dest in files:
            try:
                if await asyncio.to_thread(_kept, dest, digest):
                    continue
                await self._fetch_one(stub, digest, dest)
            except OSError as exc:
                await asyncio.to_thread(_drop_part, dest)
                raise _download_failure(dest, exc) from None
            except LocalStateError:
                await asyncio.to_thread(_drop_part, dest)
                raise

    async def _fetch_one(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, dest: Path
    ) -> None:
        part = dest.with_name(dest.name + ".part")
        await asyncio.to_thread(make_dir_durably, dest.parent)
        last: AutoglmError | None = None
        self.backoff.reset()
        attempt = 0
        refused_until: float | None = None  # while refused, tried again until then
        while attempt < self.attempts:
            try:
                writer = await asyncio.to_thread(PartFile, part)
                before = writer.size
                try:
                    await fetch_once(stub, digest, writer, free=self.free)
                finally:  # counted also when the stream breaks half way
                    await writer.close()
                    self.received_bytes += writer.size - before
                actual = writer.digest()
                if actual != digest:
                    part.unlink(missing_ok=True)
                    raise IntegrityError(
                        f"{dest.name}: downloaded bytes hash to {actual[:23]}…, expected "
                        f"{digest[:23]}…; deleted"
                    )
                os.replace(part, dest)
                await asyncio.to_thread(fsync_dir, dest.parent)
                return
            except grpc.RpcError as exc:
                last = from_rpc_error(exc, self.address)
                if not isinstance(last, Unavailable | RateLimited):
                    raise last from None
            except IntegrityError as exc:
                last = exc
            if isinstance(last, RateLimited):
                # The plane holds downloads of this device open (a dropped link's calls,
                # until its keepalive or stall limit ends them): not an attempt of this one.
                now = time.monotonic()
                if refused_until is None:
                    refused_until = now + REFUSED_FOR_S
                if now >= refused_until:
                    raise last
                delay = self.backoff.after_hint(last.retry_after_s or 1.0)
                log.warning("download of %s refused (%s); trying again in %.1fs",
                            dest.name, last, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            attempt += 1
            delay = self.backoff.next_delay()
            log.warning(
                "download of %s failed (attempt %d/%d: %s); resuming in %.1fs",
                dest.name,
                attempt,
                self.attempts,
                last,
                delay,
            )
            await asyncio.sleep(delay)
        assert last is not None
        raise last


# What the bundle's own names cause where they cannot be written (a name too long, a file
# listed where another's folder goes): retrying cannot help.
_NAME_FAULTS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EEXIST})


def _download_failure(dest: Path, exc: OSError) -> AutoglmError:
    """Whose fault a failed write of `dest` is: a name the file system cannot hold is the
    bundle's (IntegrityError); a full, read-only or failing disk, or anything else of the
    system's (permissions, ...), is the disk's (LocalStateError)."""
    if exc.errno in _NAME_FAULTS:
        return IntegrityError(
            f"{dest}: the bundle names a file this device cannot write "
            f"({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''})"
        )
    return write_failure(dest.parent, exc, "download into")


def _kept(dest: Path, digest: str) -> bool:
    """Whether `dest` is there already with the bytes of `digest` (an install that resumes).
    One whose bytes changed since it was downloaded (a damaged disk, a foreign edit) is
    deleted, so it is downloaded again instead of failing every later verification."""
    if not dest.is_file():
        return False
    actual = "sha256:" + sha256_file(dest)
    if actual == digest:
        return True
    log.warning(
        "%s: its bytes hash to %s…, not %s… as when it was downloaded (damaged on this "
        "device); deleted and downloaded again",
        dest, actual[:23], digest[:23],
    )  # fmt: skip
    remove_durably(dest)
    return False


def _drop_part(dest: Path) -> None:
    """Deletes `dest`'s partial download: bytes a full disk stopped must not keep it full."""
    part = dest.with_name(dest.name + ".part")
    try:
        remove_durably(part)
    except OSError as exc:
        log.warning("%s: cannot delete this partial download: %s", part, exc)
