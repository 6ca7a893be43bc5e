"""The maintenance windows a new session gets first come from the plane's shared recent read
(one read a period for a fleet opening its sessions at once), never from before a change made
through this plane, and at most one period old for changes made through another replica."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cloud.service.maintenance_push import MaintenancePush
from cloud.service.sessions import SessionHub
from cloud.store import Store, open_store

NOW = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'plane.db'}")


def _add(store: Store, reason: str) -> str:
    return store.add_maintenance("site=a", "", NOW, None, reason, "ops", NOW).id


def test_new_sessions_share_one_read_until_a_change_through_this_plane(store: Store) -> None:
    push = MaintenancePush(store, SessionHub(), interval_s=3600, clock=lambda: NOW)
    first = _add(store, "seal swap")
    assert [w.id for w in push.windows_in_force()] == [first]
    # Through another replica: not read again within the period (the pusher's next refresh
    # brings it to every open session, these included).
    other = _add(store, "made elsewhere")
    assert [w.id for w in push.windows_in_force()] == [first]
    # Through this plane: the next session reads it.
    push.changed()
    assert [w.id for w in push.windows_in_force()] == [first, other]


def test_a_read_older_than_the_period_is_read_again(store: Store) -> None:
    push = MaintenancePush(store, SessionHub(), interval_s=0, clock=lambda: NOW)
    assert push.windows_in_force() == []
    added = _add(store, "made elsewhere")
    assert [w.id for w in push.windows_in_force()] == [added]
