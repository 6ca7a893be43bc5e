"""Facts about the machine the agent runs on, for heartbeats and the fleet view."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from edge_agent.files import free_bytes
from protos.autoglm.v1 import common_pb2

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path` (`files.free_bytes`); 0 when unreadable."""
    return free_bytes(path)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gpu() -> str:
    """The first NVIDIA GPU's model name from the driver, or '' when none is present."""
    try:
        for info in sorted(NVIDIA_GPUS.glob("*/information")):
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return ""
    return "tegra" if TEGRA_RELEASE.exists() else ""


def _jetpack() -> str:
    """The L4T release line on a Jetson ('# R36 (release), REVISION: 3.0, ...'), else ''."""
    try:
        first = TEGRA_RELEASE.read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""
    return first.lstrip("# ").split(",")[0] + ("," + first.split(",")[1] if "," in first else "")


def collect(state_dir: Path) -> common_pb2.HostFacts:
    return common_pb2.HostFacts(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        python_version=platform.python_version(),
        cpu_count=os.cpu_count() or 0,
        memory_bytes=_memory_bytes(),
        gpu=_gpu(),
        jetpack_version=_jetpack(),
        disk_free_bytes=disk_free_bytes(state_dir),
    )
