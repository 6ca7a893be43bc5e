"""The maintenance windows a new session gets first come from the plane's shared recent read
(one read a period for a fleet opening its sessions at once), never from before a change made
through this plane, and at most one period old for changes made through another replica."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.maintenance import MaintenanceWindow
from cloud.service.maintenance_push import MaintenancePush
from cloud.service.sessions import SessionHub
from cloud.store import Store, open_store

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'plane.db'}")
    yield store
    store.close()


def _add(store: Store, reason: str, minute: int) -> str:
    created = NOW + dt.timedelta(minutes=minute)  # windows are listed by creation
    return store.add_maintenance("site=a", "", NOW, None, reason, "ops", created).id


def test_new_sessions_share_one_read_until_a_change_through_this_plane(store: Store) -> None:
    push = MaintenancePush(store, SessionHub(), interval_s=3600, clock=lambda: NOW)
    first = _add(store, "seal swap", 0)
    assert [w.id for w in push.windows_in_force()] == [first]
    # Through another replica: not read again within the period (the pusher's next refresh
    # brings it to every open session, these included).
    other = _add(store, "made elsewhere", 1)
    assert [w.id for w in push.windows_in_force()] == [first]
    # Through this plane: the next session reads it.
    push.changed()
    assert [w.id for w in push.windows_in_force()] == [first, other]


def test_a_read_older_than_the_period_is_read_again(store: Store) -> None:
    push = MaintenancePush(store, SessionHub(), interval_s=0, clock=lambda: NOW)
    assert push.windows_in_force() == []
    added = _add(store, "made elsewhere", 0)
    assert [w.id for w in push.windows_in_force()] == [added]


def test_a_read_overtaken_by_a_change_through_this_plane_is_not_kept(store: Store) -> None:
    push = MaintenancePush(store, SessionHub(), interval_s=3600, clock=lambda: NOW)
    list_maintenance = store.list_maintenance
    reads = 0

    def read_then_change(now: dt.datetime, include_ended: bool) -> list[MaintenanceWindow]:
        nonlocal reads
        reads += 1
        found = list_maintenance(now, include_ended)
        if reads == 1:  # a window added through this plane while the first read ran
            _add(store, "seal swap", 0)
            push.changed()
        return found

    patched: Any = store
    patched.list_maintenance = read_then_change
    assert push.windows_in_force() == []
    assert len(push.windows_in_force()) == 1 and reads == 2
