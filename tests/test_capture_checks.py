"""A capture's site calibration is checked as arrays: the first value that is not a finite
number, or a scale that is not positive, is named by its field and index (a largest
calibration holds 2 x 65,536 numbers: "not every value is finite" leaves one to search)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cloud.captures import CaptureCalibration, CaptureRecord, check_calibration, check_capture
from cloud.service.records import capture_from_proto
from edge_agent.errors import InvalidInput
from tests.support.captures import capture_proto, window

pytestmark = [pytest.mark.unit]
N = 256


def _largest() -> CaptureRecord:
    """A capture of 256 sensors with all of the site calibration (levels and subspace)."""
    record = capture_proto(1, window(t=4, n=N))
    return capture_from_proto("d", 1, record.capture, "records[0].capture")


def _with(cal: CaptureCalibration, name: str, index: int, value: float) -> CaptureCalibration:
    vector = list(getattr(cal, name))
    vector[index] = value
    return dataclasses.replace(cal, **{name: tuple(vector)})


@pytest.mark.parametrize(
    ("name", "index", "value", "words"),
    [
        ("level_precision", 40_000, math.nan, "level_precision[40000]: nan is not a finite number"),
        ("subspace_basis", 511, math.inf, "subspace_basis[511]: inf is not a finite number"),
        ("residual_scale", 255, -math.inf, "residual_scale[255]: -inf is not a finite number"),
        ("level_scale", 3, -1.0, "level_scale[3]: -1.0; every scale must be positive"),
        ("subspace_scale", 200, 0.0, "subspace_scale[200]: 0.0; every scale must be positive"),
    ],
)
def test_the_first_bad_value_is_named_by_field_and_index(
    name: str, index: int, value: float, words: str
) -> None:
    capture = _largest()
    assert capture.calibration is not None
    check_capture(capture, "w")  # as sent: fine
    bad = _with(capture.calibration, name, index, value)
    with pytest.raises(InvalidInput) as caught:
        check_calibration(bad, N, "records[0].capture.calibration")
    assert str(caught.value) == f"records[0].capture.calibration.{words}", str(caught.value)
    with pytest.raises(InvalidInput, match=r"w\.calibration\." + name):
        check_capture(dataclasses.replace(capture, calibration=bad), "w")


def test_the_first_of_several_bad_values_is_the_one_named() -> None:
    capture = _largest()
    assert capture.calibration is not None
    bad = _with(
        _with(capture.calibration, "level_precision", 9, math.nan), "level_precision", 7, 1e400
    )
    with pytest.raises(InvalidInput, match=r"level_precision\[7\]: inf is not"):
        check_calibration(bad, N, "c")
