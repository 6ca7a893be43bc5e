"""Process state read from Linux /proc."""

from __future__ import annotations

from pathlib import Path


def running(pid: int) -> bool:
    """Not ended (a zombie that nobody reaped yet has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
