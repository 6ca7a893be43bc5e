"""A small tmpfs mounted for one test, where this process may mount one (root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str, needs_root: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's spelling: "16m") at `mnt`, made here, unmounted after the
    block. Skips the test where it cannot be mounted: `needs_root` is the reason when this
    process is not root."""
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip(needs_root)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
