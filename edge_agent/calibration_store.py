"""Site calibrations kept on disk per (model version, asset), so a restart does not redo them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.calibration import SiteCalibration
from edge_agent.files import UNREADABLE, make_dir_durably, replace_atomically

log = logging.getLogger(__name__)

# SiteCalibration's fields after `rows`, in order; each None where calibration did not fit it.
OPTIONAL_FIELDS = (
    "level_center",
    "level_scale",
    "level_precision",
    "spread_center",
    "subspace_center",
    "subspace_basis",
    "subspace_scale",
)


class CalibrationStore:
    """Site calibrations per (model version, asset), so a restart does not recalibrate."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, version: str, asset: str) -> Path:
        return self.directory / version / f"{asset}.json"

    def load(
        self, version: str, asset: str, sensors: tuple[str, ...]
    ) -> tuple[SiteCalibration, list[float]] | None:
        path = self._path(version, asset)
        try:
            doc = json.loads(path.read_text())
            if tuple(doc["sensors"]) != sensors:
                return None
            levels = [  # absent (stored before the field): None, that evidence off
                None if doc.get(k) is None else np.asarray(doc[k], dtype=np.float32)
                for k in OPTIONAL_FIELDS
            ]
            cal = SiteCalibration(
                np.asarray(doc["input_center"], dtype=np.float32),
                np.asarray(doc["input_scale"], dtype=np.float32),
                np.asarray(doc["residual_scale"], dtype=np.float32),
                int(doc["rows"]),
                *levels,
            )
            _check(cal, len(sensors))
            return cal, [float(x) for x in doc["seed"]]
        except FileNotFoundError:
            return None
        except UNREADABLE as exc:
            log.warning("%s: unreadable calibration (%r); calibrating again", path, exc)
            return None

    def save(
        self,
        version: str,
        asset: str,
        sensors: tuple[str, ...],
        cal: SiteCalibration,
        seed: list[float],
    ) -> None:
        doc = {
            "model_version": version,
            "asset": asset,
            "sensors": list(sensors),
            "input_center": cal.input_center.tolist(),
            "input_scale": cal.input_scale.tolist(),
            "residual_scale": cal.residual_scale.tolist(),
            "rows": cal.rows,
            **{k: _listed(getattr(cal, k)) for k in OPTIONAL_FIELDS},
            "seed": seed,
        }
        path = self._path(version, asset)
        make_dir_durably(path.parent)
        replace_atomically(path, json.dumps(doc, indent=1).encode(), 0o644)


def _listed(array: np.ndarray | None) -> list[Any] | None:
    return None if array is None else list(array.tolist())


def _check(cal: SiteCalibration, n: int) -> None:
    """ValueError unless every array has the shape scoring expects for `n` sensors and finite
    values: a damaged or hand-edited file would otherwise fail every window it scores."""
    shapes: dict[str, tuple[int, ...]] = {
        "input_center": (n,),
        "input_scale": (n,),
        "residual_scale": (n,),
        "level_center": (n,),
        "level_scale": (n,),
        "level_precision": (n, n),
        "spread_center": (n,),
        "subspace_center": (n,),
        "subspace_scale": (n,),
    }
    for name, shape in shapes.items():
        value = getattr(cal, name)
        if value is None:
            continue
        if value.shape != shape or not np.isfinite(value).all():
            raise ValueError(f"{name}: shape {value.shape}, expected {shape} of finite values")
    for name in ("input_scale", "residual_scale", "level_scale", "subspace_scale"):
        value = getattr(cal, name)
        if value is not None and not (value > 0).all():
            raise ValueError(f"{name}: scales must be positive")
    subspace = (cal.subspace_center, cal.subspace_basis, cal.subspace_scale)
    if any(x is None for x in subspace) and any(x is not None for x in subspace):
        raise ValueError("subspace: centre, basis and scale go together")
    basis = cal.subspace_basis
    if basis is not None and (
        basis.ndim != 2 or basis.shape[0] != n or not 1 <= basis.shape[1] < n
    ):
        raise ValueError(f"subspace_basis: shape {basis.shape}, expected ({n}, k), 1 <= k < {n}")
    if basis is not None and not np.isfinite(basis).all():
        raise ValueError("subspace_basis: values must be finite")
