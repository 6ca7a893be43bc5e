"""One session per device across replicas on one PostgreSQL: a device opening a session on
replica B ends its older session on replica A, told where the newer one opened: at once by
the store's notification, or at A's next recheck when notifications are down; and a device
whose sessions keep replacing one another across replicas is warned about once and told to
come back later, as on one replica."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.session_claims import FLAP_REPLACEMENTS, FLAP_RETRY_S
from edge_agent.errors import RETRY_AFTER_KEY
from tests.support.cloud import RunningPlane, init_plane, start_plane
from tests.test_hostile_callers import DeviceStream, _device
from tests.test_session_backpressure import _assert_replaced, _assert_served

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def _replicas(tmp_path: Path, pg_url: str, **overrides: float) -> list[RunningPlane]:
    cloud_dir = tmp_path / "cloud"
    token = init_plane(cloud_dir, pg_url).operator_token
    return [
        start_plane(cloud_dir, token, replica_id=name, leader_election="off", **overrides)
        for name in ("r-1", "r-2")
    ]


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[list[RunningPlane]]:
    """Two replicas that recheck their sessions only hourly: notifications end them."""
    planes = _replicas(tmp_path, pg_url, auth_recheck_interval_s=3600.0)
    for plane in planes:  # both hear the other's claims before the test begins
        listener = plane.plane._listener
        assert listener is not None and listener.listening.wait(30)
    yield planes
    for plane in planes:
        plane.stop()


async def _hub_sessions(plane: RunningPlane, device_id: str) -> int:
    return len(plane.plane.hub.sessions(device_id))


def test_a_session_opened_on_another_replica_ends_the_older_one_at_once(
    replicas: list[RunningPlane], tmp_path: Path
) -> None:
    a, b = replicas
    identity = _device(a, tmp_path, "pump")
    older = DeviceStream.accepted(a, identity)
    newer = DeviceStream.accepted(b, identity)
    _assert_replaced(older, "newer session", "on replica r-2")
    _assert_served(newer, 4)
    device_id = identity.info.device_id
    assert a.call(_hub_sessions(a, device_id)) == 0
    assert b.call(_hub_sessions(b, device_id)) == 1
    older.close()
    newer.close()


def test_without_notifications_the_recheck_ends_the_older_session(
    tmp_path: Path, pg_url: str
) -> None:
    a, b = _replicas(tmp_path, pg_url, auth_recheck_interval_s=0.2)
    try:
        listener = a.plane._listener
        assert listener is not None
        a.call(asyncio.to_thread(listener.stop))  # A hears nothing from B
        identity = _device(a, tmp_path, "pump")
        older = DeviceStream.accepted(a, identity)
        newer = DeviceStream.accepted(b, identity)
        _assert_replaced(older, "on replica r-2")
        _assert_served(newer, 1)
        older.close()
        newer.close()
    finally:
        b.stop()
        a.stop()


def test_sessions_replacing_one_another_across_replicas_are_told_to_come_back_later(
    replicas: list[RunningPlane], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "cloud.service.sessions")
    for plane in replicas:
        plane.plane.hub.clock = lambda: 0.0  # every replacement within FLAP_WINDOW_S
    identity = _device(replicas[0], tmp_path, "clone")
    streams: list[DeviceStream] = []
    endings: list[grpc.RpcError | None] = []
    for i in range(FLAP_REPLACEMENTS + 2):  # the two clones, on the two replicas in turns
        streams.append(DeviceStream.accepted(replicas[i % 2], identity))
        if i:  # the one before ends before the next clone reconnects, as clones do
            endings.append(streams[-2].ending())
    codes = [e.code() if e is not None else None for e in endings]
    assert codes == [grpc.StatusCode.ABORTED] * FLAP_REPLACEMENTS + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ], codes
    hinted = endings[-1]
    assert hinted is not None
    assert "keep replacing one another" in (hinted.details() or ""), hinted.details()
    assert (RETRY_AFTER_KEY, str(round(FLAP_RETRY_S * 1000))) in (hinted.trailing_metadata() or ())
    warnings = [r.getMessage() for r in caplog.records if r.name == "cloud.service.sessions"]
    assert len(warnings) == 1 and identity.info.device_id in warnings[0], warnings
    _assert_served(streams[-1], 1)
    for stream in streams:
        stream.close()
