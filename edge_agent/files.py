"""Durable file writes for keys, identities and secrets (explicit modes, fsync, atomic
rename), and the lock that keeps one process per state directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from edge_agent.errors import LocalStateError

# What reading a damaged JSON state file can raise, beyond FileNotFoundError: bytes that are
# not JSON or not UTF-8 (ValueError), a document of the wrong shape (KeyError, TypeError,
# AttributeError), Infinity where a count belongs (int(): OverflowError), nesting too deep
# to parse (RecursionError). Every loader of such a file treats them alike.
UNREADABLE: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    ArithmeticError,
    RecursionError,
)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates `path` (never overwrites) with `mode`, and fsyncs it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes, mode: int) -> None:
    """Writes a sibling temporary file with `mode`, then renames it over `path`.

    A reader sees the old content or the new, never a part; raises OSError on failure and
    leaves no temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode does not apply to a file that already existed
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if missing) while the block runs; the file
    names the process holding it. Another process asking for it gets a `LocalStateError`
    naming that process, at once. The lock goes with the process, also on kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LocalStateError(
                f"{path.parent} is in use by {owner}; stop it first, or give this one its "
                "own directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
