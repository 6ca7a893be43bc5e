"""The maintenance windows a new session gets first come from the plane's shared recent read
(one read a period for a fleet opening its sessions at once), never from before a change made
through this plane, and at most one period old for changes made through another replica."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.maintenance import MaintenanceWindow
from cloud.service import maintenance_push
from cloud.service.maintenance_push import MaintenancePush
from cloud.service.sessions import SessionHub
from cloud.store import Store, open_store
from protos.autoglm.v1 import agent_pb2

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


def test_a_refresh_sends_each_session_its_periods_and_lets_the_loop_run_between_slices(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each open session gets the periods that name its device, once (a second refresh sends
    nothing); over a fleet the refresh gives the event loop turns, so other sessions' acks
    do not wait for all of it."""
    monkeypatch.setattr(maintenance_push, "FLEET_SLICE", 10)
    built = []
    build = maintenance_push.maintenance_message
    monkeypatch.setattr(
        maintenance_push, "maintenance_message", lambda *a: built.append(1) or build(*a)
    )
    hub = SessionHub()
    push = MaintenancePush(store, hub, interval_s=3600, clock=lambda: NOW)
    window = _add(store, "seal swap", 0)  # names site=a
    everywhere = store.add_maintenance("site", "", NOW, None, "audit", "ops", NOW).id
    sessions = {}
    for i in range(35):
        device = store.create_device(f"pump-{i}", {"site": "ab"[i % 2]}, "", NOW)
        sessions[device.id] = (hub.open(device.id), "ab"[i % 2])

    async def refresh() -> tuple[int, list[int], int]:
        seen: list[int] = []  # how many sessions had their message at each turn of another task
        refreshing = asyncio.create_task(push.refresh())
        while not refreshing.done():
            seen.append(sum(live.outbound.qsize() for live, _ in sessions.values()))
            await asyncio.sleep(0)
        return await refreshing, seen, await push.refresh()

    sent, seen, again = asyncio.run(refresh())
    assert sent == 35 and again == 0
    # One message per distinct set of periods (site=a's, site=b's) a refresh, not per device.
    assert len(built) == 4
    assert any(0 < n < 35 for n in seen), seen  # the loop ran while the fleet was part done
    for live, site in sessions.values():
        message = live.outbound.get_nowait()
        assert isinstance(message, agent_pb2.ControlMessage)
        periods = [p.id for p in message.maintenance.periods]
        expected = [window, everywhere] if site == "a" else [everywhere]
        assert sorted(periods) == sorted(expected), (site, periods)
