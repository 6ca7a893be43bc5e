"""Sensor history files (CSV with `,` or `;`, Parquet) read into typed tables.

Every error names the file and, for CSV, the line (1-based, the header is line 1). Empty cells
are missing readings (NaN, masked by alignment); any other non-numeric cell is an error.
Only the time column and the requested columns are parsed, so a caller that asks for sensor
columns never touches label columns.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import InvalidInput
from edge_agent.ingest.decode import MAX_READING
from edge_agent.windowing import FloatArray, TimeArray

TIME_COLUMN_NAMES = ("datetime", "timestamp", "time", "date", "ts")
CYCLE_COLUMN_NAMES = ("cycle", "cycles")  # a count of cycles: only where no clock column is
DEFAULT_LABEL_COLUMNS = ("anomaly", "changepoint")
SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class SensorTable:
    """Rows of one file: times in epoch seconds, values [R, N] (NaN = missing), labels."""

    path: Path
    time_texts: tuple[str, ...]
    times: TimeArray
    columns: tuple[str, ...]
    values: FloatArray
    labels: FloatArray | None

    @property
    def rows(self) -> int:
        return int(self.times.shape[0])


def list_data_files(root: Path) -> list[Path]:
    """The data files under `root` (or `root` itself), in a stable order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InvalidInput(f"{root}: no such file or directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise InvalidInput(f"{root}: no .csv or .parquet files")
    return files


def read_header(path: Path) -> tuple[list[str], str]:
    """Column names and the delimiter of a CSV, or the column names of a Parquet file."""
    if path.suffix.lower() == ".parquet":
        return _parquet_columns(path), ""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read: {exc}") from exc
    if not first.strip():
        raise InvalidInput(f"{path}: empty file (no header line)")
    delimiter = ";" if first.count(";") > first.count(",") else ","
    names = [name.strip() for name in next(csv.reader([first], delimiter=delimiter))]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{path}:1: duplicate column names in {names}")
    return names, delimiter


def find_time_column(path: Path, names: Sequence[str], given: str | None) -> str:
    """The time column: the one given, else the first with a clock's conventional name,
    else the first named as a cycle count."""
    if given is not None:
        if given not in names:
            raise InvalidInput(f"{path}:1: time column {given!r} not in {list(names)}")
        return given
    for accepted in (TIME_COLUMN_NAMES, CYCLE_COLUMN_NAMES):
        for name in names:
            if name.lower() in accepted:
                return name
    raise InvalidInput(
        f"{path}:1: no time column (looked for "
        f"{', '.join(TIME_COLUMN_NAMES + CYCLE_COLUMN_NAMES)}); name it with --time-column"
    )


def read_table(
    path: Path,
    sensors: Sequence[str],
    time_column: str | None = None,
    label_column: str | None = None,
) -> SensorTable:
    """Read the time column, the `sensors` columns in that order and optionally one label."""
    names, delimiter = read_header(path)
    time_name = find_time_column(path, names, time_column)
    missing = [s for s in sensors if s not in names]
    if missing:
        raise InvalidInput(f"{path}:1: missing sensor columns {missing}")
    if label_column is not None and label_column not in names:
        raise InvalidInput(f"{path}:1: missing label column {label_column!r}")
    wanted = [time_name, *sensors] + ([label_column] if label_column else [])
    if path.suffix.lower() == ".parquet":
        cells, lines = _parquet_cells(path, wanted)
    else:
        cells, lines = _csv_cells(path, names, delimiter, wanted)
    if not lines:
        raise InvalidInput(f"{path}: no data rows")
    time_texts = tuple(cells[0])
    times = np.array(
        [_parse_time(path, line, text) for line, text in zip(lines, time_texts, strict=True)],
        dtype=np.float64,
    )
    _check_order(path, lines, times)
    values = np.empty((len(lines), len(sensors)), dtype=np.float32)
    for j, name in enumerate(sensors):
        column = cells[1 + j]
        for i, text in enumerate(column):
            values[i, j] = _parse_number(path, lines[i], name, text)
    labels = None
    if label_column is not None:
        labels = np.array(
            [_parse_number(path, lines[i], label_column, t) for i, t in enumerate(cells[-1])],
            dtype=np.float32,
        )
        if np.isnan(labels).any():
            bad = lines[int(np.argmax(np.isnan(labels)))]
            raise InvalidInput(f"{path}:{bad}: empty label in column {label_column!r}")
    return SensorTable(path, time_texts, times, tuple(sensors), values, labels)


def _csv_cells(
    path: Path, names: list[str], delimiter: str, wanted: list[str]
) -> tuple[list[list[str]], list[int]]:
    positions = [names.index(w) for w in wanted]
    cells: list[list[str]] = [[] for _ in wanted]
    lines: list[int] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        next(reader)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(names):
                raise InvalidInput(f"{path}:{line}: {len(row)} fields, the header has {len(names)}")
            for k, pos in enumerate(positions):
                cells[k].append(row[pos].strip())
            lines.append(line)
    return cells, lines


def _parquet_columns(path: Path) -> list[str]:
    pq = _pyarrow_parquet()
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable Parquet file: {exc}") from exc


def _parquet_cells(path: Path, wanted: list[str]) -> tuple[list[list[str]], list[int]]:
    pq = _pyarrow_parquet()
    try:
        table = pq.read_table(path, columns=wanted)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable Parquet file: {exc}") from exc
    cells = [["" if v is None else str(v) for v in table.column(w).to_pylist()] for w in wanted]
    # Parquet has no lines; report the row number (1-based, as a CSV with a header would).
    return cells, list(range(2, table.num_rows + 2))


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidInput(
            "reading Parquet needs pyarrow: pip install 'open-autoglm-edge[cloud]'"
        ) from exc
    return pq


def _parse_time(path: Path, line: int, text: str) -> float:
    if not text:
        raise InvalidInput(f"{path}:{line}: empty timestamp")
    try:
        return float(text)  # epoch seconds
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{path}:{line}: cannot read timestamp {text!r}") from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _parse_number(path: Path, line: int, column: str, text: str) -> float:
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError as exc:
        raise InvalidInput(f"{path}:{line}: column {column!r}: {text!r} is not a number") from exc
    if math.isinf(value):
        raise InvalidInput(f"{path}:{line}: column {column!r}: {text!r} is not finite")
    if abs(value) > MAX_READING:  # a "no data" sentinel (3.4e38): missing, as on the agent
        return math.nan
    return value


def _check_order(path: Path, lines: list[int], times: TimeArray) -> None:
    steps = np.diff(times)
    if steps.size == 0:
        return
    if (steps < 0).any():
        i = int(np.argmax(steps < 0)) + 1
        raise InvalidInput(
            f"{path}:{lines[i]}: timestamp goes backwards (line {lines[i - 1]} is later); "
            "sort the file by time"
        )
    if (steps == 0).any():
        i = int(np.argmax(steps == 0)) + 1
        raise InvalidInput(f"{path}:{lines[i]}: duplicate timestamp (same as line {lines[i - 1]})")
