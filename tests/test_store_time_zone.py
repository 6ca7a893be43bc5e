"""The PostgreSQL store reads and writes times in UTC whatever time zone the server, the
database or the URL names: a time at either end of the calendar a timestamp holds comes back
as stored, and listings that include it work."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from cloud.domain import AlertEventRecord, AlertFilter
from cloud.store.sql import SqlStore
from tests.support.stores import NOW

pytestmark = [pytest.mark.integration, pytest.mark.postgres]
LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
EARLIEST = dt.datetime(1, 1, 1, 0, 0, 20, tzinfo=dt.UTC)


def _event(device: str, seq: int, at: dt.datetime, asset: str) -> AlertEventRecord:
    """An alert event the store takes as given (one stored before devices' times were
    bounded is like this)."""
    return AlertEventRecord(
        device, seq, f"k{seq}", "raised", asset, "f", 2.0, [("s", 1.0)], at, at, at, "1"
    )


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York"])
def test_times_at_the_calendars_ends_list_in_any_server_time_zone(pg_url: str, zone: str) -> None:
    """Before, the server turned 9999-12-31T23:59:59Z into year 10000 in Tokyo (0001-01-01
    into year 0 in New York), and every alert listing failed with a DataError."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE \"{pg_url.rsplit('/', 1)[1]}\" SET timezone TO '{zone}'")
    store = SqlStore(f"{pg_url}?options=-c%20TimeZone%3DAsia/Kolkata")  # the URL's zone too
    device = store.create_device("p", {}, "", NOW).id
    events = [
        _event(device, 1, LATEST, "a"),
        _event(device, 2, NOW, "b"),
        _event(device, 3, EARLIEST, "c"),
    ]
    store.store_records(device, [], events, NOW)
    seen = {a.asset: a.last_seen for a in store.list_alerts(AlertFilter(), 10)}
    assert seen == {"a": LATEST, "b": NOW, "c": EARLIEST}, seen
    assert len(store.alerts_after(0)) == 3
    assert store.get_device(device).created_at == NOW
    store.close()
