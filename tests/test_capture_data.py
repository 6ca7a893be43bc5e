"""The export format of captured windows, read back as written, and fine-tuning's refusals:
an export whose sensors or window length are not the base model's, or without any labelled
window, is a clear error before anything is trained."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.captures import CaptureLabel, CaptureRecord
from cloud.model.capture_data import DATA_FILE, README_FILE, SUMMARY_FILE, read_export, write_export
from cloud.model.finetune import FinetuneOptions, finetune_bundle
from cloud.service.records import capture_from_proto
from edge_agent.capture import ALERT, SAMPLE
from edge_agent.errors import AlreadyExists, InvalidInput
from tests.support.captures import capture_proto, window
from tests.support.sensordata import SENSORS

pytestmark = pytest.mark.unit


def stored(sequence: int, **changes: object) -> CaptureRecord:
    captured = dataclasses.replace(window(seed=sequence), **changes)  # type: ignore[arg-type]
    record = capture_proto(sequence, captured)
    return capture_from_proto("device-1", sequence, record.capture, "test")


def rows(*items: tuple[CaptureRecord, str]) -> Iterator[tuple[CaptureRecord, CaptureLabel, str]]:
    for capture, verdict in items:
        yield capture, CaptureLabel("alert-1" if verdict else "", verdict), "edge-1"


def test_an_export_reads_back_as_written(tmp_path: Path) -> None:
    alert = stored(1, alert_key="k1")
    fault = stored(2, alert_key="k2")
    unjudged = stored(3, alert_key="k3")
    sample = stored(4, reason=SAMPLE, alert_key="")
    out = tmp_path / "export"
    summary = write_export(
        rows((alert, "false"), (fault, "true"), (unjudged, ""), (sample, "")),
        out,
        {"since": "x"},
    )
    assert summary.windows == 4
    assert dict(summary.labels) == {"normal": 2, "fault": 1, "unknown": 1}
    doc = json.loads((out / SUMMARY_FILE).read_text())
    assert doc["windows"] == 4 and doc["sensor_schemas"] == [["s0", "s1", "s2", "s3"]]
    assert doc["time_range"]["first_window_start"].startswith("2026-")
    assert "| label |" in (out / README_FILE).read_text()
    back = read_export(out)
    assert back.sensors == ("s0", "s1", "s2", "s3") and back.values.shape == (4, 24, 4)
    assert back.label.tolist() == [0, 1, -1, 0]
    assert back.reason == (ALERT, ALERT, ALERT, SAMPLE)
    values, mask = alert.arrays()
    np.testing.assert_array_equal(back.mask[0], mask)
    np.testing.assert_array_equal(np.isnan(back.values[0]), mask == 0)
    np.testing.assert_array_equal(back.values[0][mask > 0], values[mask > 0])
    np.testing.assert_allclose(back.input_scale[0], 0.25)
    with pytest.raises(AlreadyExists):
        write_export(rows(), out, {})


def test_windows_of_two_schemas_are_refused_naming_the_row(tmp_path: Path) -> None:
    out = tmp_path / "export"
    other = stored(2, sensors=("a", "b", "c", "d"))
    write_export(rows((stored(1), "false"), (other, "false")), out, {})
    with pytest.raises(InvalidInput, match=r"row 2 .*edge-1 sequence 2.*one model.s windows"):
        read_export(out)
    (out / DATA_FILE).write_bytes(b"not parquet")
    with pytest.raises(InvalidInput, match="not a readable Parquet file"):
        read_export(out)
    with pytest.raises(InvalidInput, match=r"no captures\.parquet"):
        read_export(tmp_path)


@pytest.mark.slow
def test_fine_tuning_refuses_exports_the_base_cannot_take(
    tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> None:
    bundle, key = trained
    options = FinetuneOptions(epochs=1, threads=1)
    cases = {
        "sensors ['s0', 's1', 's2', 's3'] are not the base model pump:1's": stored(1),
        "windows of 30 rows; the base model pump:1 takes 24": stored(
            2, sensors=SENSORS, values=np.ones((30, 4), np.float32), mask=np.ones((30, 4))
        ),
        "no labelled window": stored(3, sensors=SENSORS),
    }
    for i, (words, capture) in enumerate(cases.items()):
        export = tmp_path / f"export-{i}"
        verdict = "" if words == "no labelled window" else "false"
        write_export(rows((capture, verdict)), export, {})
        with pytest.raises(InvalidInput) as caught:
            finetune_bundle(export, bundle, tmp_path / f"out-{i}", options, key, log=print)
        assert words in str(caught.value), str(caught.value)
        assert not (tmp_path / f"out-{i}").exists()


def test_the_site_calibration_travels_through_the_export(tmp_path: Path) -> None:
    """Each window's whole site calibration comes back as the agent's `SiteCalibration`; a
    window from an agent that did not send it comes back without one."""
    new, old = stored(1, alert_key="k1"), stored(2, calibration=None)
    out = tmp_path / "export"
    write_export(rows((new, "false"), (old, "true")), out, {})
    back = read_export(out)
    sent = window(seed=1).calibration
    assert sent is not None and sent.level_precision is not None
    cal = back.calibration[0]
    assert cal is not None and cal.level_precision is not None and back.calibration[1] is None
    np.testing.assert_allclose(cal.level_precision, sent.level_precision)
    for name in ("residual_scale", "level_center", "level_scale", "spread_center",
                 "subspace_center", "subspace_basis", "subspace_scale"):  # fmt: skip
        np.testing.assert_allclose(getattr(cal, name), getattr(sent, name), err_msg=name)
    assert cal.subspace_basis is not None and cal.subspace_basis.shape == (4, 2)
    np.testing.assert_allclose(cal.input_center, back.input_center[0])


def test_an_export_from_before_the_subspace_fields_reads_with_the_kind_off(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    write_export(rows((stored(1), "false")), out, {})
    table = pq.read_table(out / DATA_FILE)
    docs = table.column("calibration").to_pylist()
    for doc in docs:
        for name in ("subspace_center", "subspace_basis", "subspace_scale"):
            del doc[name]
    column = table.schema.get_field_index("calibration")
    pq.write_table(table.set_column(column, "calibration", pa.array(docs)), out / DATA_FILE)
    (cal,) = read_export(out).calibration
    assert cal is not None and cal.level_center is not None
    assert (cal.subspace_center, cal.subspace_basis, cal.subspace_scale) == (None, None, None)


def test_an_export_from_before_the_calibration_column_still_reads(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    write_export(rows((stored(1), "false"), (stored(2), "")), out, {})
    table = pq.read_table(out / DATA_FILE)
    pq.write_table(table.drop_columns(["calibration"]), out / DATA_FILE)
    back = read_export(out)
    assert back.size == 2 and back.calibration == (None, None)
    assert back.label.tolist() == [0, -1]
