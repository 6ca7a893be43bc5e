"""Two control-plane replicas on one PostgreSQL: an operator revoked through one is refused by
the other as soon as it hears PostgreSQL's change notification, not when its cached token
expires (the cache is made to last an hour here, so only the notification can do it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.service import guard
from edge_agent.errors import Unauthenticated
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import wait_for
from tests.support.cloud import RunningPlane, init_plane, start_plane

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def replicas(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RunningPlane, RunningPlane]]:
    monkeypatch.setattr(guard, "TOKEN_CACHE_S", 3600.0)
    cloud_dir = tmp_path / "cloud"
    token = init_plane(cloud_dir, pg_url).operator_token
    planes = [start_plane(cloud_dir, token, replica_id=name) for name in ("r-1", "r-2")]
    for plane in planes:
        listener = plane.plane._listener
        assert listener is not None and listener.listening.wait(30)
    yield planes[0], planes[1]
    for plane in planes:
        plane.stop()


def _refused(plane: RunningPlane, token: str) -> bool:
    with plane.client(token) as client:
        try:
            client.list_alerts(operator_pb2.ListAlertsRequest())
        except Unauthenticated:
            return True
    return False


def test_every_replica_drops_a_revoked_operators_cached_token(
    replicas: tuple[RunningPlane, RunningPlane],
) -> None:
    one, other = replicas
    with one.client() as admin:
        eve = admin.add_operator("eve", "viewer").token
    assert not _refused(other, eve)  # her token is cached on the other replica now
    assert not _refused(one, eve)
    with one.client() as admin:
        admin.revoke_operator("eve")
    assert _refused(one, eve), "the replica that revoked her refuses her at once"
    wait_for(lambda: _refused(other, eve), timeout=30)
    # The others' tokens are looked up again, and still good.
    assert not _refused(other, other.token)
