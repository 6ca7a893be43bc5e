"""Artifact downloads by digest over mutual TLS, resumed from where an interruption left off.

A file arrives as `<name>.part`; every retry asks the control plane for the bytes from the
part's current size on. The finished part is hashed and only renamed to its name when the
sha256 matches the digest asked for; a mismatch deletes it (the next attempt starts over).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from edge_agent.errors import AutoglmError, IntegrityError, Unavailable, from_rpc_error
from edge_agent.retry import Backoff
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)
CHUNK = 1 << 20
# Bulk transfers want big flow-control windows; the session channel turns BDP probing off.
DOWNLOAD_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.http2.bdp_probe", 1),
]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


async def fetch_once(
    stub: agent_pb2_grpc.AgentServiceStub, digest: str, dest: Path, chunk_size: int = CHUNK
) -> int:
    """Appends the artifact's missing bytes to `dest.part`; returns the bytes received."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    received = 0
    request = agent_pb2.DownloadArtifactRequest(digest=digest, offset=offset, chunk_size=chunk_size)
    with part.open("ab") as fh:
        try:
            async for chunk in stub.DownloadArtifact(request):  # type: ignore[attr-defined]
                if chunk.offset != offset:
                    raise IntegrityError(
                        f"{digest}: chunk at offset {chunk.offset}, expected {offset}"
                    )
                fh.write(chunk.data)
                offset += len(chunk.data)
                received += len(chunk.data)
        finally:
            fh.flush()
            os.fsync(fh.fileno())
    return received


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class Downloader:
    """Fetches artifacts on its own channel (bulk traffic stays off the session stream)."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials,
        options: list[tuple[str, Any]],
        backoff: Backoff,
        attempts: int = 6,
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.options = [*options, *DOWNLOAD_OPTIONS]
        self.backoff = backoff
        self.attempts = attempts
        self.received_bytes = 0  # over the downloader's life, resumed attempts included

    async def fetch(self, files: list[tuple[str, Path]]) -> None:
        """Downloads (digest, destination) pairs that are not there yet, verifying each."""
        async with aio.secure_channel(self.address, self.credentials, options=self.options) as ch:
            stub = agent_pb2_grpc.AgentServiceStub(ch)
            for digest, dest in files:
                if dest.is_file():
                    continue
                await self._fetch_one(stub, digest, dest)

    async def _fetch_one(
        self, stub: agent_pb2_grpc.AgentServiceStub, digest: str, dest: Path
    ) -> None:
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        last: AutoglmError | None = None
        self.backoff.reset()
        for attempt in range(1, self.attempts + 1):
            try:
                before = _size(part)
                try:
                    await fetch_once(stub, digest, dest)
                finally:  # counted also when the stream breaks half way
                    self.received_bytes += _size(part) - before
                actual = await asyncio.to_thread(sha256_of, part)
                if actual != digest:
                    part.unlink(missing_ok=True)
                    raise IntegrityError(
                        f"{dest.name}: downloaded bytes hash to {actual[:23]}…, expected "
                        f"{digest[:23]}…; deleted"
                    )
                os.replace(part, dest)
                return
            except grpc.RpcError as exc:
                last = from_rpc_error(exc, self.address)
                if not isinstance(last, Unavailable):
                    raise last from None
            except IntegrityError as exc:
                last = exc
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
