"""An agent whose sessions the control plane ends within seconds (its store failing each
batch, a flapping link) backs off between them instead of reconnecting every second; a
session that lasted resets the backoff. Over real mutual TLS against a real plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import Unavailable
from edge_agent.retry import Backoff
from tests.conftest import register
from tests.support.agents import enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane

pytestmark = pytest.mark.integration


class CountingBackoff(Backoff):
    """A Backoff with short delays that says how far up its curve it is."""

    def __init__(self) -> None:
        super().__init__(0.05, 0.2)
        self.delays: list[int] = []

    def next_delay(self) -> float:
        delay = super().next_delay()
        self.delays.append(self._attempt)
        return delay


def test_sessions_ended_at_once_back_off_and_one_that_lasted_resets(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "flappy", site="a"), tmp_path / "a")
    device_id = identity.info.device_id
    hub = plane.plane.hub
    agent = start_session(identity, heartbeat_interval_s=0.2)
    backoff = CountingBackoff()
    agent.session.backoff = backoff
    try:
        for ended in range(4):
            wait_for(lambda: plane.call(_open(hub, device_id)) and agent.session.connected)
            plane.loop.call_soon_threadsafe(
                hub.end_device, device_id, Unavailable("the store is away (test)")
            )
            wait_for(lambda n=ended: len(backoff.delays) > n)
        # Each short session was a failure: the delays climbed.
        assert backoff.delays == [1, 2, 3, 4], backoff.delays
        # One that lasted (here: past a bound of 0) resets the curve.
        wait_for(lambda: plane.call(_open(hub, device_id)) and agent.session.connected)
        agent.session.stable_after_s = 0.0
        plane.loop.call_soon_threadsafe(
            hub.end_device, device_id, Unavailable("the store is away (test)")
        )
        wait_for(lambda: len(backoff.delays) > 4)
        assert backoff.delays[4] == 1, backoff.delays
    finally:
        agent.stop()


async def _open(hub: object, device_id: str) -> bool:
    return bool(hub.is_open(device_id))  # type: ignore[attr-defined]
