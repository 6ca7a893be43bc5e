"""Durable file writes for keys, identities, secrets and state (explicit modes, fsync, atomic
rename, the folder fsynced after every rename, unlink and mkdir), and the lock that keeps one
process per state directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from edge_agent.errors import DiskFull, LocalStateError, ReadOnlyDisk

log = logging.getLogger(__name__)

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
    """Writes a sibling temporary file with `mode`, renames it over `path` and fsyncs the
    folder, so the new content is what a power cut leaves once this returns.

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
        fsync_dir(path.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# What fsync on a directory raises on file systems that cannot sync one (some FUSE file
# systems, 9p, vboxsf, CIFS): the change is in place, only its durability is not promised.
# SQLite (unixSync) and PostgreSQL (fsync_fname) ignore these for directories too.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_dir_fsync_unsupported_logged = False


def fsync_dir(path: Path) -> None:
    """Makes a rename, unlink or mkdir inside `path` durable; a file system that cannot
    fsync a directory is logged once per process and otherwise left alone."""
    global _dir_fsync_unsupported_logged
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
        if not _dir_fsync_unsupported_logged:
            _dir_fsync_unsupported_logged = True
            log.warning(
                "the file system holding %s cannot fsync a directory (%s): renames, removals "
                "and new folders there are made but may not survive a power cut",
                path,
                exc.strerror or exc,
            )
    finally:
        os.close(fd)


def remove_durably(path: Path) -> bool:
    """Unlinks the file `path` and fsyncs its folder, so it stays gone after a power cut;
    False when there was nothing to remove."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def make_dir_durably(path: Path, mode: int = 0o777) -> None:
    """Creates the folder `path` and any missing parents (an existing one is fine), fsyncing
    the folder each new one was made in: a file written and fsynced in it afterwards is not
    lost with an unsynced directory entry."""
    missing: list[Path] = []
    current = path
    while not current.is_dir() and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by someone else, who syncs it
        fsync_dir(directory.parent)


def sync_tree(root: Path) -> None:
    """Fsyncs every file and folder under `root` (itself included), deepest first: what an
    extraction wrote without syncing is on disk once this returns."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(folder))


def fsync_file(path: Path) -> None:
    """Flushes a file another writer left unsynced (an extraction, a library's save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the disk holding `path` (its nearest
    existing parent); 0 when that cannot be read."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except FileNotFoundError:
            continue
        except OSError:
            return 0
    return 0


def write_failure(path: Path, exc: OSError, doing: str = "write") -> LocalStateError:
    """A `LocalStateError` for a failed write at `path` that says why in words: a full disk
    (`DiskFull`, with the bytes free), a read-only file system (`ReadOnlyDisk`), or the
    system's own message."""
    cause = f"({exc.strerror or exc})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full: {free_bytes(path)} bytes free at {path} {cause}")
    if exc.errno == errno.EROFS:
        return ReadOnlyDisk(f"read-only file system at {path} {cause}")
    return LocalStateError(f"cannot {doing} {path} {cause}")


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
