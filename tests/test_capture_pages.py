"""Capture listings are paged by the memory their captures hold as well as by count, on
SQLite and PostgreSQL: a page never holds more than its bytes (a largest capture read back
holds about 4 MiB, so 1,000 to a page were 4 GiB), every capture still comes once and in
order, and a page smaller than one capture still moves on by one."""

from __future__ import annotations

import datetime as dt
import tracemalloc

import pytest

from cloud.captures import CaptureFilter, CaptureRecord, held_bytes, labelled_pages
from cloud.service.records import capture_from_proto
from cloud.store import Store, sql_base
from tests.support.captures import T0, capture_proto, window
from tests.support.stores import NOW, PostgresBackend, SqliteBackend

pytestmark = [pytest.mark.integration]
SINCE = dt.datetime.fromtimestamp(T0, dt.UTC)
N = 128  # sensors: with the whole site calibration, about 0.5 MiB held a capture
PER_DEVICE = 20


def _capture(device_id: str, sequence: int) -> CaptureRecord:
    record = capture_proto(sequence, window(t=4, n=N, seed=sequence % 3))
    return capture_from_proto(device_id, sequence, record.capture, "test")


def _seed(store: Store) -> list[tuple[str, int]]:
    """Two devices' captures; their (device id, sequence) in listing order."""
    stored = []
    for name in ("a", "b"):
        device_id = store.create_device(name, {}, "", NOW).id
        captures = [_capture(device_id, s) for s in range(1, PER_DEVICE + 1)]
        store.store_records(device_id, [], [], NOW, captures=captures)
        stored += [(device_id, c.sequence) for c in captures]
    return sorted(stored)


def _pages(store: Store, where: CaptureFilter, max_bytes: int) -> list[list[CaptureRecord]]:
    pages, after = [], ("", 0)
    while page := store.list_captures(where, after, 1000, max_bytes):
        pages.append(page)
        after = (page[-1].device_id, page[-1].sequence)
    return pages


class CapturePageContract:
    @pytest.mark.parametrize("by_device", [False, True])
    def test_pages_end_at_their_bytes_and_every_capture_comes_once(
        self, store: Store, by_device: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sql_base, "ID_CHUNK", 1)  # one device an IN list: pages span two
        stored = _seed(store)
        one = held_bytes(_capture("x", 1))
        devices = tuple(sorted({d for d, _ in stored})) if by_device else None
        where = CaptureFilter(SINCE, devices)
        pages = _pages(store, where, int(3.5 * one))
        listed = [(c.device_id, c.sequence) for page in pages for c in page]
        assert listed == stored, listed
        sizes = [sum(held_bytes(c) for c in page) for page in pages]
        assert all(size <= 3.5 * one for size in sizes), (one, sizes)
        assert [len(p) for p in pages[:-1]] == [3] * (len(pages) - 1), [len(p) for p in pages]
        # Smaller than one capture: one a page, never none.
        assert [len(p) for p in _pages(store, where, one // 2)] == [1] * len(stored)


class TestSqliteCapturePages(SqliteBackend, CapturePageContract):
    def test_a_listing_holds_a_page_of_bytes_in_memory_not_a_page_of_captures(
        self, store: Store
    ) -> None:
        """Read through `labelled_pages` at the default count (200, all 40 at once before):
        the most memory held at any time is the page's bytes and the rows in flight."""
        stored = _seed(store)
        one = held_bytes(_capture("x", 1))
        page_bytes = 4 << 20
        assert one * len(stored) > 4 * page_bytes, (one, len(stored))
        listed, largest = [], 0
        tracemalloc.start()
        try:
            for page in labelled_pages(store, CaptureFilter(SINCE), 200, page_bytes):
                listed += [(c.device_id, c.sequence) for c, _ in page]
                largest = max(largest, sum(held_bytes(c) for c, _ in page))
                del page
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert listed == stored
        assert largest <= page_bytes, largest
        # A page, the 4 rows read ahead, and the one that starts the next page; everything
        # at once would be over 16 MiB.
        assert peak < page_bytes + 8 * one + (2 << 20), (peak, one)


@pytest.mark.postgres
class TestPostgresCapturePages(PostgresBackend, CapturePageContract):
    pass
