"""The export format of captured windows: `captures.parquet` (one row per window), with
`export.json` (what was asked, counts, time range, schema) and a README, in one directory.

`autoglm data export` writes it; `autoglm model train --from-export` reads it. Labels come
from operators' verdicts (`cloud.captures.training_label`): 1 a verified fault, 0 normal (a
false alarm, or a sampled normal window), -1 unknown (an alert nobody judged yet).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.captures import (
    CALIBRATION_FIELDS,
    CaptureCalibration,
    CaptureLabel,
    CaptureRecord,
    check_calibration,
    training_label,
)
from edge_agent.calibration import SiteCalibration
from edge_agent.errors import AlreadyExists, InvalidInput
from edge_agent.windowing import FloatArray

DATA_FILE = "captures.parquet"
SUMMARY_FILE = "export.json"
README_FILE = "README.md"
FORMAT = 1
ROW_GROUP = 500  # windows per Parquet row group: memory stays bounded while writing
COLUMNS = {
    "device_id": "string",
    "device_name": "string",
    "sequence": "int64",
    "reason": "string: alert (the window that raised alert_key) | sample (a normal window)",
    "asset": "string",
    "model_version": "string: the model that scored the window",
    "alert_key": "string: the edge's key of the raise ('' for a sample)",
    "alert_id": "string: the cloud alert it folded into",
    "verdict": "string: the operator's verdict on that alert ('' none yet)",
    "fault_type": "string",
    "label": "int8: 1 fault, 0 normal, -1 unknown (left out of training)",
    "score": "float64: the window's score on the device (1.0 = alert threshold)",
    "window_start": "timestamp[us, UTC]",
    "window_end": "timestamp[us, UTC]",
    "period_s": "float64",
    "length": "int32: T rows",
    "sensors": "list<string>: N names, column order",
    "timestamps": "list<float64>: epoch seconds of the T rows",
    "values": "list<float32>: T*N, row-major, site units, NaN where no reading",
    "mask": "list<uint8>: T*N, 1 = a reading",
    "input_center": "list<float32>: N, the site calibration (network input = (x-c)/s)",
    "input_scale": "list<float32>: N",
    "calibration": "struct or null: the rest of that site calibration (residual_scale, "
    "level_center, level_scale, spread_center: list<float32> N; level_precision: N*N "
    "row-major; the level ones empty where the decision uses no levels; subspace_center, "
    "subspace_scale: N, subspace_basis: N*k row-major, empty where the site has no subspace "
    "or the agent did not send it); null for windows from agents that did not send it",
}
OPTIONAL_COLUMNS = ("calibration",)  # exports written before it was added lack it


@dataclass
class ExportSummary:
    """What an export holds (written as export.json)."""

    windows: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    devices: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    schemas: set[tuple[str, ...]] = field(default_factory=set)
    first: dt.datetime | None = None
    last: dt.datetime | None = None

    def add(self, c: CaptureRecord, label: CaptureLabel, device_name: str, value: int) -> None:
        self.windows += 1
        self.labels[{1: "fault", 0: "normal", -1: "unknown"}[value]] += 1
        self.reasons[c.reason] += 1
        self.verdicts[label.verdict or "none"] += 1
        self.devices.add(device_name or c.device_id)
        self.models.add(c.model_version)
        self.schemas.add(c.sensors)
        self.first = min(self.first or c.window_start, c.window_start)
        self.last = max(self.last or c.window_end, c.window_end)

    def as_dict(self, query: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "query": query,
            "file": DATA_FILE,
            "windows": self.windows,
            "labels": dict(self.labels),
            "reasons": dict(self.reasons),
            "verdicts": dict(self.verdicts),
            "devices": sorted(self.devices),
            "model_versions": sorted(self.models),
            "sensor_schemas": [list(s) for s in sorted(self.schemas)],
            "time_range": {
                "first_window_start": self.first.isoformat() if self.first else None,
                "last_window_end": self.last.isoformat() if self.last else None,
            },
            "columns": COLUMNS,
        }


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidInput(
            "writing and reading exports needs pyarrow: pip install 'open-autoglm-edge[cloud]'"
        ) from exc
    return pa, pq


def _schema(pa: Any) -> Any:
    stamp = pa.timestamp("us", tz="UTC")
    types = {
        "sequence": pa.int64(),
        "label": pa.int8(),
        "score": pa.float64(),
        "window_start": stamp,
        "window_end": stamp,
        "period_s": pa.float64(),
        "length": pa.int32(),
        "sensors": pa.list_(pa.string()),
        "timestamps": pa.list_(pa.float64()),
        "values": pa.list_(pa.float32()),
        "mask": pa.list_(pa.uint8()),
        "input_center": pa.list_(pa.float32()),
        "input_scale": pa.list_(pa.float32()),
        "calibration": pa.struct([(name, pa.list_(pa.float32())) for name in CALIBRATION_FIELDS]),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


def _row(c: CaptureRecord, label: CaptureLabel, device_name: str, value: int) -> dict[str, Any]:
    values, mask = c.arrays()
    start = c.window_start.timestamp()
    return {
        "device_id": c.device_id,
        "device_name": device_name,
        "sequence": c.sequence,
        "reason": c.reason,
        "asset": c.asset,
        "model_version": c.model_version,
        "alert_key": c.alert_key,
        "alert_id": label.alert_id,
        "verdict": label.verdict,
        "fault_type": label.fault_type,
        "label": value,
        "score": c.score,
        "window_start": c.window_start,
        "window_end": c.window_end,
        "period_s": c.period_s,
        "length": c.length,
        "sensors": list(c.sensors),
        "timestamps": [start + k * c.period_s for k in range(c.length)],
        "values": values.reshape(-1).tolist(),
        "mask": mask.reshape(-1).astype(np.uint8).tolist(),
        "input_center": list(c.input_center),
        "input_scale": list(c.input_scale),
        "calibration": None if c.calibration is None else c.calibration.as_doc(),
    }


def write_export(
    windows: Iterable[tuple[CaptureRecord, CaptureLabel, str]], out: Path, query: dict[str, Any]
) -> ExportSummary:
    """Writes the export directory `out` (it must not exist; written beside, then renamed)."""
    if out.exists():
        raise AlreadyExists(f"{out}: exists; pick a new export directory")
    pa, pq = _pyarrow()
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    schema = _schema(pa)
    summary = ExportSummary()
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(staging / DATA_FILE, schema) as writer:
        for capture, label, device_name in windows:
            value = training_label(capture.reason, label.verdict)
            summary.add(capture, label, device_name, value)
            rows.append(_row(capture, label, device_name, value))
            if len(rows) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows or summary.windows == 0:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    doc = summary.as_dict(query)
    (staging / SUMMARY_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    (staging / README_FILE).write_text(_readme(doc))
    staging.rename(out)
    return summary


def _readme(doc: dict[str, Any]) -> str:
    lines = [
        "# Captured windows",
        "",
        f"{doc['windows']} windows exported {doc['created_at']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(doc['labels'].items())) or 'none'}); "
        f"query {json.dumps(doc['query'])}.",
        f"Windows from {doc['time_range']['first_window_start']} to "
        f"{doc['time_range']['last_window_end']}, devices {', '.join(doc['devices']) or '-'}, "
        f"model versions {', '.join(doc['model_versions']) or '-'}.",
        "",
        f"`{DATA_FILE}` has one row per window. Fine-tune a model on it with",
        "`autoglm model train --from-export DIR --base MODEL_VERSION --out BUNDLE`.",
        "Labels: 1 a verified fault (verdict true), 0 normal (verdict false: a false alarm;",
        "or a sampled normal window), -1 unknown (no verdict yet; left out of training).",
        "",
        "| column | type |",
        "|---|---|",
        *(f"| {name} | {kind} |" for name, kind in COLUMNS.items()),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ExportedWindows:
    """An export read back as arrays: values [W, T, N] (NaN where missing), mask, labels."""

    sensors: tuple[str, ...]
    values: FloatArray
    mask: FloatArray
    label: np.ndarray  # int8 [W]
    input_center: FloatArray  # [W, N]
    input_scale: FloatArray  # [W, N]
    reason: tuple[str, ...]
    score: FloatArray  # [W] the device's score
    # [W]: the whole site calibration each window was scored under; None where the export
    # has none for it (captured by an agent from before it was sent, or an older export)
    calibration: tuple[SiteCalibration | None, ...] = ()

    @property
    def size(self) -> int:
        return int(self.label.shape[0])


def read_export(directory: Path) -> ExportedWindows:
    """Reads an export; every window must share one sensor schema and length."""
    path = directory / DATA_FILE
    if not path.is_file():
        raise InvalidInput(f"{directory}: no {DATA_FILE}; `autoglm data export` writes one")
    _, pq = _pyarrow()
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = [c for c in COLUMNS if c not in table.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise InvalidInput(f"{path}: not an export of captured windows (no columns {missing})")
    if table.num_rows == 0:
        raise InvalidInput(f"{path}: no windows")
    present = [name for name in COLUMNS if name in table.column_names]
    cols = {name: table.column(name).to_pylist() for name in present}
    cols.setdefault("calibration", [None] * table.num_rows)
    sensors, length = tuple(cols["sensors"][0]), int(cols["length"][0])
    n = len(sensors)
    for i in range(table.num_rows):
        if tuple(cols["sensors"][i]) != sensors or cols["length"][i] != length:
            raise InvalidInput(
                f"{path}: row {i + 1} ({cols['device_name'][i]} sequence {cols['sequence'][i]}) "
                f"has {cols['length'][i]} rows of {cols['sensors'][i]}; row 1 has {length} of "
                f"{list(sensors)}: export one model's windows at a time"
            )
        if len(cols["values"][i]) != length * n or len(cols["mask"][i]) != length * n:
            raise InvalidInput(f"{path}: row {i + 1}: values or mask are not {length} x {n}")
    shape = (table.num_rows, length, n)
    center = np.asarray(cols["input_center"], dtype=np.float32)
    scale = np.asarray(cols["input_scale"], dtype=np.float32)
    calibration = []
    for i, doc in enumerate(cols["calibration"]):
        try:
            calibration.append(site_calibration(center[i], scale[i], doc, n))
        except InvalidInput as exc:
            raise InvalidInput(f"{path}: row {i + 1}: {exc}") from None
    return ExportedWindows(
        sensors=sensors,
        values=np.asarray(cols["values"], dtype=np.float32).reshape(shape),
        mask=np.asarray(cols["mask"], dtype=np.float32).reshape(shape),
        label=np.asarray(cols["label"], dtype=np.int8),
        input_center=center,
        input_scale=scale,
        reason=tuple(cols["reason"]),
        score=np.asarray(cols["score"], dtype=np.float32),
        calibration=tuple(calibration),
    )


def site_calibration(
    center: FloatArray, scale: FloatArray, doc: dict[str, list[float]] | None, n: int
) -> SiteCalibration | None:
    """The site calibration of an exported window (None where it has none)."""
    if doc is None:
        return None
    cal = CaptureCalibration.from_doc(doc)
    check_calibration(cal, n, "calibration")

    def vector(values: tuple[float, ...], shape: tuple[int, ...]) -> FloatArray | None:
        return np.asarray(values, dtype=np.float32).reshape(shape) if values else None

    return SiteCalibration(
        input_center=center,
        input_scale=scale,
        residual_scale=np.asarray(cal.residual_scale, dtype=np.float32),
        rows=0,  # not exported: nothing downstream of calibration reads it
        level_center=vector(cal.level_center, (n,)),
        level_scale=vector(cal.level_scale, (n,)),
        level_precision=vector(cal.level_precision, (n, n)),
        spread_center=vector(cal.spread_center, (n,)),
        # absent (an older agent or export): None, the subspace kind off for the window
        subspace_center=vector(cal.subspace_center, (n,)),
        subspace_basis=vector(cal.subspace_basis, (n, len(cal.subspace_basis) // n)),
        subspace_scale=vector(cal.subspace_scale, (n,)),
    )
