"""Every JSON state file the agent reads at start survives damage: a file of the wrong shape,
Infinity where a count belongs, nesting too deep to parse. Each loader falls back as it says
(starts without it, or refuses the model pointer with LocalStateError) instead of letting
OverflowError, AttributeError or RecursionError escape the agent's start (a crash loop)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.calibration_store import CalibrationStore
from edge_agent.capture import CaptureDay, CaptureSampler
from edge_agent.config import CapturePolicy
from edge_agent.errors import LocalStateError
from edge_agent.maintenance import FILE, SiteMaintenance
from edge_agent.open_alerts import OpenAlerts
from edge_agent.slots import POINTER, ModelSlots

pytestmark = pytest.mark.unit

DAMAGE = {
    "infinite count": (
        b'{"day": Infinity, "bytes": 1, "sample_bytes": 1, "strata": {}, "rows": Infinity, '
        b'"periods": [], "top_sensors": [], "active": {"a": 1}}'
    ),
    "a list": b"[1, 2, 3]",
    "a number": b"7",
    "too deep": b"[" * 200_000 + b"]" * 200_000,
    "not utf-8": b"\xff\xfe{",
}


def _capture(tmp: Path) -> object:
    return CaptureSampler(CapturePolicy(), tmp / "capture.json").today


def _maintenance(tmp: Path) -> object:
    return SiteMaintenance(tmp).periods


def _open_alert(tmp: Path) -> object:
    return OpenAlerts(tmp).load("pump-1")


def _calibration(tmp: Path) -> object:
    return CalibrationStore(tmp).load("1", "pump-1", ("a",))


LOADERS: dict[str, tuple[Callable[[Path], object], str, object]] = {
    "capture": (_capture, "capture.json", CaptureDay()),
    "maintenance": (_maintenance, FILE, ()),
    "open alert": (_open_alert, "pump-1.json", None),
    "calibration": (_calibration, "1/pump-1.json", None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_damaged_state_file_falls_back(tmp_path: Path, loader: str, damage: str) -> None:
    load, name, fallback = LOADERS[loader]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DAMAGE[damage])
    assert load(tmp_path) == fallback


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_pointer_is_refused_with_a_clear_error(tmp_path: Path, damage: str) -> None:
    (tmp_path / POINTER).write_bytes(DAMAGE[damage])
    with pytest.raises(LocalStateError, match="unreadable"):
        ModelSlots(tmp_path).read()
