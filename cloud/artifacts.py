"""Content-addressed artifact storage: files named by their sha256, written once.

`ArtifactStore` is the interface (an object store can implement it); `LocalArtifactStore`
keeps files under a directory, `sha256/<first two hex>/<hex>`. A write streams into a
temporary file, hashes as it goes and only renames into place when the digest matches, so a
reader never sees a partial or wrong artifact.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from edge_agent.errors import IntegrityError, InvalidInput, NotFound
from edge_agent.files import fsync_dir

log = logging.getLogger(__name__)
PREFIX = "sha256:"
DEFAULT_CHUNK = 1 << 20
# A push streams into incoming/<uuid>.part; a process killed mid-push (SIGKILL, a crash, a
# power cut) leaves its file there. At start, part files untouched this long are removed;
# younger ones may be another replica's push in progress (the directory may be shared).
STALE_PART_S = 6 * 3600
_NAMES_LOGGED = 20


def parse_digest(digest: str) -> str:
    """The hex of a `sha256:<64 hex>` digest; InvalidInput for anything else."""
    hexpart = digest.removeprefix(PREFIX)
    if (
        not digest.startswith(PREFIX)
        or len(hexpart) != 64
        or any(c not in "0123456789abcdef" for c in hexpart)
    ):
        raise InvalidInput(f"artifact digest {digest[:80]!r} is not 'sha256:' and 64 lowercase hex")
    return hexpart


class ArtifactStore(abc.ABC):
    """Where bundle files live, by digest."""

    @abc.abstractmethod
    def size(self, digest: str) -> int:
        """Size in bytes; NotFound when the store does not hold it."""

    def has(self, digest: str) -> bool:
        try:
            self.size(digest)
        except NotFound:
            return False
        return True

    @abc.abstractmethod
    def read(self, digest: str, offset: int = 0, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """The artifact's bytes from `offset` on, in chunks of at most `chunk` bytes."""

    @abc.abstractmethod
    def open_writer(self, digest: str) -> ArtifactWriter:
        """A writer for `digest`: `write` its bytes, then `commit` (checks the digest) or
        `abort`."""

    def write(self, digest: str, chunks: Iterable[bytes]) -> int:
        """Stores `chunks` as `digest` (IntegrityError when they hash otherwise)."""
        writer = self.open_writer(digest)
        try:
            for block in chunks:
                writer.write(block)
            return writer.commit()
        finally:
            writer.abort()


class ArtifactWriter(abc.ABC):
    @abc.abstractmethod
    def write(self, block: bytes) -> None: ...

    @abc.abstractmethod
    def commit(self) -> int:
        """Checks the digest and makes the artifact visible; returns its size."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops what was written (no-op after a commit)."""


class _LocalWriter(ArtifactWriter):
    def __init__(self, digest: str, target: Path, tmp: Path) -> None:
        self.digest = digest
        self.target = target
        self.tmp = tmp
        self.hasher = hashlib.sha256()
        self.size = 0
        self.fh = tmp.open("wb")

    def write(self, block: bytes) -> None:
        self.hasher.update(block)
        self.fh.write(block)
        self.size += len(block)

    def commit(self) -> int:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        actual = PREFIX + self.hasher.hexdigest()
        if actual != self.digest:
            raise IntegrityError(
                f"artifact sent as {self.digest} hashes to {actual} ({self.size} bytes); not stored"
            )
        self.target.parent.mkdir(exist_ok=True)
        os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)
        return self.size

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a local directory (the embedded default: STATE_DIR/artifacts)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "incoming").mkdir(parents=True, exist_ok=True)
        self._remove_stale_parts(clock())

    def _remove_stale_parts(self, now: float) -> None:
        """Removes the partial pushes (`incoming/*.part`) not written for STALE_PART_S,
        saying which; a file that cannot be removed is said and left."""
        removed: list[str] = []
        freed = 0
        for part in sorted((self.root / "incoming").glob("*.part")):
            try:
                info = part.stat()
                if now - info.st_mtime < STALE_PART_S:
                    continue
                part.unlink()
            except FileNotFoundError:  # its push ended, or another replica removed it
                continue
            except OSError as exc:
                log.warning("artifacts: cannot remove the partial push %s: %s", part, exc)
                continue
            removed.append(part.name)
            freed += info.st_size
        if removed:
            shown = ", ".join(removed[:_NAMES_LOGGED])
            more = (
                f" and {len(removed) - _NAMES_LOGGED} more" if len(removed) > _NAMES_LOGGED else ""
            )
            log.warning(
                "artifacts: removed %d partial push file(s) of %d bytes in %s, untouched for "
                "over %d h (a process stopped mid-push): %s%s",
                len(removed), freed, self.root / "incoming", STALE_PART_S // 3600, shown, more,
            )  # fmt: skip

    def path(self, digest: str) -> Path:
        hexpart = parse_digest(digest)
        return self.root / "sha256" / hexpart[:2] / hexpart

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in the store") from None

    def read(self, digest: str, offset: int = 0, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        path = self.path(digest)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in the store") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if offset > size:
                raise InvalidInput(f"offset {offset} is past the end of {digest} ({size} bytes)")
            fh.seek(offset)
            while block := fh.read(chunk):
                yield block

    def open_writer(self, digest: str) -> ArtifactWriter:
        return _LocalWriter(
            digest, self.path(digest), self.root / "incoming" / f"{uuid.uuid4().hex}.part"
        )
