"""`model evaluate` and `model predict`: back-testing a bundle on history, the SKAB way.

Per file, rows [0, K) calibrate the bundle without labels (the routine the agent runs), and
every row from K on is scored from that row and earlier rows only.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.model.data import list_data_files, read_header, read_table
from cloud.model.metrics import Counts
from edge_agent.bundle import Manifest, unpack_tar, verify_bundle
from edge_agent.errors import InvalidInput
from edge_agent.inference.base import open_backend
from edge_agent.scoring import ModelFrame, WindowModel, calibrate_and_score, frame_of, row_scores
from edge_agent.trust import Verifier
from edge_agent.windowing import FloatArray, align_to_grid


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle opened with one backend."""

    directory: Path
    manifest: Manifest
    model: WindowModel
    frame: ModelFrame


@contextmanager
def open_bundle_dir(bundle: Path, key: Verifier) -> Iterator[tuple[Path, Manifest]]:
    """Verify a bundle directory or `.tar`; yields its directory and manifest."""
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="autoglm-bundle-") as tmp:
            directory = unpack_tar(bundle, Path(tmp))
            yield directory, verify_bundle(directory, key)
        return
    if not bundle.is_dir():
        raise InvalidInput(f"{bundle}: no such bundle (directory or .tar)")
    yield bundle, verify_bundle(bundle, key)


@contextmanager
def load_model(
    bundle: Path, key: Verifier, variant: str = "fp32", threads: int = 0
) -> Iterator[LoadedModel]:
    with open_bundle_dir(bundle, key) as (directory, manifest):
        backend = open_backend("onnxruntime", directory, manifest, variant, threads=threads)
        try:
            yield LoadedModel(directory, manifest, backend, frame_of(manifest))
        finally:
            backend.close()


def score_file(
    loaded: LoadedModel, path: Path, calibration_rows: int, time_column: str | None = None
) -> tuple[tuple[str, ...], FloatArray, np.ndarray]:
    """Timestamps, scores and flags of rows [K, end) of one file; reads no label column."""
    manifest = loaded.manifest
    sensors = [s.name for s in manifest.sensors]
    table = read_table(path, sensors, time_column)
    if table.rows <= calibration_rows:
        raise InvalidInput(
            f"{path}: {table.rows} rows; calibration takes {calibration_rows}, none left to score"
        )
    series = align_to_grid(
        table.times, table.values, manifest.sampling.period_s, manifest.sampling.max_staleness_s
    )
    first_slot = int(series.row_slot[calibration_rows])
    try:
        slots = calibrate_and_score(loaded.model, loaded.frame, series, first_slot)
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc}") from None
    scores, flags = row_scores(slots, series.row_slot, calibration_rows)
    return table.time_texts[calibration_rows:], scores, flags


@dataclass(frozen=True)
class FileResult:
    path: str
    rows: int
    counts: Counts


def evaluate(
    loaded: LoadedModel,
    data: Path,
    calibration_rows: int,
    label_column: str = "anomaly",
    time_column: str | None = None,
) -> tuple[list[FileResult], Counts]:
    """Point-wise counts per file and summed, for every labelled file under `data`."""
    results = []
    total = Counts()
    for path in list_data_files(data):
        names, _ = read_header(path)
        if label_column not in names:
            raise InvalidInput(f"{path}:1: no label column {label_column!r} to evaluate against")
        _, _, flags = score_file(loaded, path, calibration_rows, time_column)
        # Labels are read separately, after scoring, so they cannot reach the model.
        labels = read_table(path, [], time_column, label_column).labels
        assert labels is not None
        counts = Counts.of(flags, labels[calibration_rows:] > 0.5)
        results.append(FileResult(_relative(path, data), len(flags), counts))
        total = total + counts
    return results, total


def predict(
    loaded: LoadedModel,
    data: Path,
    calibration_rows: int,
    out: Path,
    time_column: str | None = None,
) -> list[Path]:
    """For every input file, `datetime,score,anomaly` rows from row K on, same relative path."""
    written = []
    for path in list_data_files(data):
        stamps, scores, flags = score_file(loaded, path, calibration_rows, time_column)
        target = out / Path(_relative(path, data)).with_suffix(".csv")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with partial.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["datetime", "score", "anomaly"])
            for stamp, score, flag in zip(stamps, scores, flags, strict=True):
                writer.writerow([stamp, f"{float(score):.6f}", int(flag)])
        partial.replace(target)
        written.append(target)
    return written


def _relative(path: Path, root: Path) -> str:
    return path.name if root.is_file() else str(path.relative_to(root))
