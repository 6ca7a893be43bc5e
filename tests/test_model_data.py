"""Reading sensor files and aligning them: clear errors for bad files, causal alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.model.data import find_time_column, list_data_files, read_table
from edge_agent.errors import InvalidInput
from edge_agent.windowing import WindowSpec, align_to_grid, strided_ends, windows_ending_at

pytestmark = pytest.mark.unit

HEADER = "datetime;a;b;anomaly\n"


def write(tmp_path: Path, text: str, name: str = "f.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(n: int, delimiter: str = ";") -> str:
    return "".join(
        delimiter.join([f"2024-01-01 00:00:{i:02d}", str(i), str(2 * i), "0"]) + "\n"
        for i in range(n)
    )


def test_reads_semicolon_and_comma_files_alike(tmp_path: Path) -> None:
    semi = read_table(
        write(tmp_path, HEADER + rows(5), "s.csv"), ["a", "b"], label_column="anomaly"
    )
    comma = read_table(
        write(tmp_path, HEADER.replace(";", ",") + rows(5, ","), "c.csv"), ["a", "b"]
    )
    assert semi.values.tolist() == comma.values.tolist()
    assert semi.labels is not None and comma.labels is None
    assert semi.times[1] - semi.times[0] == 1.0


def test_reads_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"timestamp": [0.0, 1.0, 2.0], "a": [1.0, None, 3.0], "b": [4.0, 5.0, 6.0]})
    pq.write_table(table, tmp_path / "x.parquet")
    read = read_table(tmp_path / "x.parquet", ["b", "a"])
    assert read.values[:, 0].tolist() == [4.0, 5.0, 6.0]
    assert np.isnan(read.values[1, 1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        (HEADER, "no data rows"),
        (
            HEADER + rows(2) + "2024-01-01 00:00:05;x;1;0\n",
            "f.csv:4: column 'a': 'x' is not a number",
        ),
        (HEADER + rows(2) + "2024-01-01 00:00:05;1;0\n", "f.csv:4: 3 fields, the header has 4"),
        (HEADER + rows(2) + "2024-01-01 00:00:05;1;2;0;9\n", "f.csv:4: 5 fields"),
        (HEADER + rows(3) + "2024-01-01 00:00:01;1;2;0\n", "f.csv:5: timestamp goes backwards"),
        (HEADER + rows(3) + "2024-01-01 00:00:02;1;2;0\n", "f.csv:5: duplicate timestamp"),
        (HEADER + "yesterday;1;2;0\n", "f.csv:2: cannot read timestamp 'yesterday'"),
        (
            HEADER + rows(1) + "2024-01-01 00:00:05;inf;1;0\n",
            "f.csv:3: column 'a': 'inf' is not finite",
        ),
        ("when;a;b\n1;2;3\n", "f.csv:1: no time column"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as err:
        read_table(path, ["a", "b"], label_column="anomaly" if "anomaly" in text else None)
    assert message in str(err.value)


def test_missing_sensor_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"f.csv:1: missing sensor columns \['c'\]"):
        read_table(write(tmp_path, HEADER + rows(3)), ["a", "c"])


def test_empty_cell_is_a_missing_reading_and_masked(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "2024-01-01 00:00:00;1;2;0\n2024-01-01 00:00:01;;3;0\n")
    table = read_table(path, ["a", "b"])
    assert np.isnan(table.values[1, 0])
    series = align_to_grid(table.times, table.values, period_s=1.0, max_staleness_s=0.5)
    assert series.mask.tolist() == [[1, 1], [0, 1]]
    assert series.values[1, 0] == 1.0  # holds the last value, marked invalid


def test_directory_listing_is_sorted_and_refuses_empty(tmp_path: Path) -> None:
    write(tmp_path, HEADER + rows(2), "b.csv")
    write(tmp_path, HEADER + rows(2), "a.csv")
    assert [p.name for p in list_data_files(tmp_path)] == ["a.csv", "b.csv"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"no \.csv or \.parquet"):
        list_data_files(tmp_path / "empty")
    with pytest.raises(InvalidInput, match="no such file or directory"):
        list_data_files(tmp_path / "missing")


def test_gap_beyond_staleness_is_masked_and_windows_pad_before_start() -> None:
    times = np.array([0.0, 1.0, 2.0, 6.0, 7.0])
    values = np.arange(10, dtype=np.float32).reshape(5, 2)
    series = align_to_grid(times, values, period_s=1.0, max_staleness_s=1.0)
    assert series.slots == 8
    assert series.mask[:, 0].tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    _x, m = windows_ending_at(series, np.array([1]), length=3)
    assert m[0, :, 0].tolist() == [0, 1, 1]
    spec = WindowSpec(length=3, stride=2, period_s=1.0, max_staleness_s=1.0)
    assert strided_ends(series.slots, spec).tolist() == [2, 4, 6]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.floats(0.2, 3.0), min_size=2, max_size=40),
    cut=st.integers(1, 39),
    period=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_alignment_is_causal(steps: list[float], cut: int, period: float) -> None:
    """Changing readings after time t never changes any slot at or before t."""
    times = np.cumsum([0.0, *steps])
    rng = np.random.default_rng(0)
    values = rng.standard_normal((times.size, 2)).astype(np.float32)
    cut = min(cut, times.size - 1)
    changed = values.copy()
    changed[cut:] += 100.0
    a = align_to_grid(times, values, period, 2 * period)
    b = align_to_grid(times, changed, period, 2 * period)
    limit = int(np.floor((times[cut] - times[0]) / period - 1e-9))
    keep = slice(0, max(0, min(limit + 1, a.slots)))
    if times[cut] - times[0] == limit * period:
        keep = slice(0, max(0, limit))
    assert np.array_equal(a.values[keep], b.values[keep])
    assert np.array_equal(a.mask[keep], b.mask[keep])


def test_a_cycle_count_is_the_time_only_where_no_clock_column_is(tmp_path: Path) -> None:
    both = tmp_path / "both.csv"
    both.write_text("cycle,timestamp,a\n1,1700000000,0.5\n2,1700000060,0.6\n")
    assert find_time_column(both, ["cycle", "timestamp", "a"], None) == "timestamp"
    only = read_table(write(tmp_path, "unit,cycle,a\n1,1,0.5\n1,2,0.6\n", "c.csv"), ["unit", "a"])
    assert only.times[1] - only.times[0] == 1.0
    with pytest.raises(InvalidInput, match=r"looked for datetime.*cycle"):
        find_time_column(both, ["unit", "a"], None)


def test_a_no_data_sentinel_is_a_missing_reading_as_on_the_agent(tmp_path: Path) -> None:
    """A historian's float32 'no data' value (3.4e38) is missing, as the agent drops it
    (out_of_range), so `predict` and the agent calibrate on the same readings."""
    path = write(
        tmp_path, HEADER + "2024-01-01 00:00:00;3.4028235e38;2;0\n2024-01-01 00:00:01;1;-1e38;0\n"
    )
    table = read_table(path, ["a", "b"])
    assert np.isnan(table.values[0, 0]) and np.isnan(table.values[1, 1])
    assert table.values[1, 0] == 1.0 and table.values[0, 1] == 2.0
