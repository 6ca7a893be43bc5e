"""Lookups by many device ids name them in IN lists of at most ID_CHUNK, on SQLite and on
PostgreSQL: the capture listing and the device labels that alerts and webhook deliveries
read. A fleet past a statement's bound parameters (SQLite 32,766, psycopg 65,535) is here
made by a small ID_CHUNK, and each statement's parameters are counted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event

from cloud.captures import CaptureFilter, CaptureRecord
from cloud.domain import AlertFilter
from cloud.store import Store, sql_base
from cloud.store.sql import SqlStore
from tests.support.stores import NOW, PostgresBackend, SqliteBackend
from tests.test_store_alarms import _send_all
from tests.test_store_contract_fleet import _event

pytestmark = [pytest.mark.integration]

CHUNK = 4
DEVICES = 4 * CHUNK + 3  # five lists, the last one short
OTHER_PARAMETERS = 6  # a statement's own bound values besides its id list


class ParameterCount:
    """The most bound parameters any statement of the store was run with."""

    def __init__(self) -> None:
        self.most = 0

    def __call__(
        self, _conn: Any, _cursor: Any, _sql: str, params: Any, _ctx: Any, many: bool
    ) -> None:
        if not many and params:
            self.most = max(self.most, len(params))


@pytest.fixture
def counted(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[ParameterCount]:
    assert isinstance(store, SqlStore)
    monkeypatch.setattr(sql_base, "ID_CHUNK", CHUNK)
    count = ParameterCount()
    event.listen(store.engine, "before_cursor_execute", count)
    yield count
    event.remove(store.engine, "before_cursor_execute", count)


def _capture(device_id: str, sequence: int) -> CaptureRecord:
    return CaptureRecord(
        device_id=device_id,
        sequence=sequence,
        reason="sample",
        asset="pump-1",
        model_version="1",
        alert_key="",
        score=0.5,
        window_start=NOW,
        period_s=1.0,
        length=2,
        sensors=("flow",),
        values=np.zeros(2, dtype="<f4").tobytes(),
        mask=np.packbits(np.ones(2, dtype=np.uint8)).tobytes(),
        input_center=(0.0,),
        input_scale=(1.0,),
    )


class IdListContract:
    def test_captures_of_more_devices_than_one_list_come_in_order_page_by_page(
        self, store: Store, counted: ParameterCount
    ) -> None:
        ids = [store.create_device(f"d{i:02}", {}, "", NOW).id for i in range(DEVICES)]
        left_out = store.create_device("other", {}, "", NOW).id
        for device_id in [*ids, left_out]:
            captures = [_capture(device_id, 1), _capture(device_id, 2)]
            store.store_records(device_id, [], [], NOW, captures=captures)
        counted.most = 0
        where = CaptureFilter(NOW - dt.timedelta(hours=1), tuple(reversed(ids)))
        pages, after = [], ("", 0)
        while page := store.list_captures(where, after, limit=5):
            pages.append(page)
            after = (page[-1].device_id, page[-1].sequence)
        listed = [(c.device_id, c.sequence) for page in pages for c in page]
        assert listed == sorted((d, s) for d in ids for s in (1, 2)), listed
        assert [len(p) for p in pages[:-1]] == [5] * (len(pages) - 1)  # full pages
        assert counted.most <= CHUNK + OTHER_PARAMETERS, counted.most
        # Everything at once; and a cursor within a device's captures.
        every = store.list_captures(where, limit=1000)
        assert [(c.device_id, c.sequence) for c in every] == listed
        last = sorted(ids)[-1]
        rest = store.list_captures(where, (last, 1), limit=1000)
        assert [(c.device_id, c.sequence) for c in rest] == [(last, 2)]

    def test_alerts_of_more_devices_than_one_list_are_released_with_their_labels(
        self, store: Store, counted: ParameterCount
    ) -> None:
        """Alerts on many devices held back by a window end together: the release reads the
        devices' labels (for the windows still in force) and queues each delivery with its
        device's name and labels, in lists of ID_CHUNK."""
        ids = [
            store.create_device(f"d{i:02}", {"site": "a", "n": str(i)}, "", NOW).id
            for i in range(DEVICES)
        ]
        store.add_webhook("http://example.com/h", "s", "", NOW)
        end = NOW + dt.timedelta(hours=1)
        window = store.add_maintenance("site=a", "", NOW, end, "line stop", "op", NOW)
        store.add_maintenance("site=b", "", NOW, None, "elsewhere", "op", NOW)
        for device_id in ids:
            store.store_records(device_id, [], [_event(device_id, 1, "raised")], NOW)
        held = {a.suppressed_by for a in store.list_alerts(AlertFilter())}
        assert held == {window.label}, held
        assert _send_all(store, NOW) == []
        counted.most = 0
        released = store.release_suppressed(end)
        assert sorted(a.device_id for a in released) == sorted(ids)
        assert counted.most <= CHUNK + OTHER_PARAMETERS, counted.most
        sent = _send_all(store, end)
        names = {d.payload["alert"]["device_id"]: d.payload for d in sent}
        assert len(sent) == DEVICES and set(names) == set(ids), len(sent)
        for i, device_id in enumerate(ids):
            assert names[device_id]["device_labels"] == {"site": "a", "n": str(i)}


class TestSqliteIdLists(SqliteBackend, IdListContract):
    pass


@pytest.mark.postgres
class TestPostgresIdLists(PostgresBackend, IdListContract):
    pass
