"""The times on a device's records (`cloud.service.bounds.RecordTimes`): from 2000-01-01 to a
day past the batch's arrival, a window never ending before it starts; what is refused says
which record, which field and why."""

from __future__ import annotations

import datetime as dt

import pytest

from cloud.service.bounds import EARLIEST_RECORD_TIME, RecordTimes
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit
RECEIVED = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
NOW_S = int(RECEIVED.timestamp())
DAY = 86_400
TIMES = RecordTimes.received_at(RECEIVED)


def _stamp(message: object, seconds: int, nanos: int = 0) -> None:
    message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]


def _prediction(start: int, end: int, end_nanos: int = 0) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=1)
    _stamp(record.prediction.window_start, start)
    _stamp(record.prediction.window_end, end, end_nanos)
    return record


def _alert(start: int, end: int, raised: int) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=1)
    record.alert.kind = agent_pb2.AlertEvent.KIND_RAISED
    _stamp(record.alert.window_start, start)
    _stamp(record.alert.window_end, end)
    _stamp(record.alert.raised_at, raised)
    return record


def _capture(start: int) -> agent_pb2.Record:
    record = agent_pb2.Record(sequence=1)
    _stamp(record.capture.window_start, start)
    return record


def test_times_within_the_range_pass() -> None:
    early = int(EARLIEST_RECORD_TIME.timestamp())
    for record in (
        _prediction(NOW_S - 10, NOW_S),
        _prediction(early, NOW_S + DAY),  # both ends of the range
        _prediction(NOW_S, NOW_S),  # a window of one instant
        _alert(NOW_S - 10, NOW_S, NOW_S - 3600),  # a clearing: raised an hour before
        _capture(NOW_S - 30),
        agent_pb2.Record(sequence=1),  # no body: refused elsewhere, with its own reason
    ):
        TIMES.check(record, "records[0]")
    assert TIMES.fits((early, 0), (NOW_S + DAY, 999_999))
    assert TIMES.fits((NOW_S, 5), (NOW_S, 5))


@pytest.mark.parametrize(
    ("record", "field", "why"),
    [
        (_prediction(NOW_S - 10, 253_402_300_799), "prediction.window_end", "9999-12-31T23:59:59Z"),
        (_prediction(NOW_S - 10, NOW_S + DAY + 1), "prediction.window_end", "more than a day"),
        (_prediction(0, NOW_S), "prediction.window_start", "1970-01-01T00:00:00Z is before 2000"),
        (_prediction(-62_135_596_800, NOW_S), "prediction.window_start", "0001-01-01"),
        (_prediction(NOW_S, NOW_S - 1), "prediction.window_end", "before its window_start"),
        (_alert(NOW_S - 10, NOW_S, 253_402_300_799), "alert.raised_at", "after the batch"),
        (_alert(NOW_S - 10, NOW_S, 0), "alert.raised_at", "unset, or the device's"),
        (_alert(NOW_S, NOW_S - 10, NOW_S), "alert.window_end", "before its window_start"),
        (_capture(NOW_S + 2 * DAY), "capture.window_start", "(2026-11-01T12:00:00Z)"),
    ],
)
def test_times_out_of_the_range_are_refused_with_where_and_why(
    record: agent_pb2.Record, field: str, why: str
) -> None:
    with pytest.raises(InvalidInput, match=r"^records\[3\] \(sequence 1\)\." + field) as err:
        TIMES.check(record, "records[3] (sequence 1)")
    assert why in str(err.value), err.value


def test_the_fast_paths_test_agrees() -> None:
    """`fits` is `check` for a prediction's window, on the seconds and fraction it read."""
    for start, end in [
        ((NOW_S - 10, 0), (NOW_S, 0)),
        ((NOW_S, 500), (NOW_S, 499)),
        ((0, 0), (NOW_S, 0)),
        ((NOW_S, 0), (NOW_S + DAY + 1, 0)),
        ((NOW_S, 0), (NOW_S + DAY, 999_999_999)),
    ]:
        record = _prediction(start[0], end[0], end[1])
        record.prediction.window_start.nanos = start[1]
        try:
            TIMES.check(record, "r")
            checked = True
        except InvalidInput:
            checked = False
        assert TIMES.fits(start, end) == checked, (start, end)
