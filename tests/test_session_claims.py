"""Session claims at their edges: a setup whose claim fails records no session, and the
sessions a newer claim replaced end once, counted once, whatever order the claims, their
notifications and the periodic recheck arrive in (`cloud.service.replacements`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloud.clock import utc_now
from cloud.service.sessions import LiveSession, SessionHub
from cloud.session_claims import FLAP_REPLACEMENTS, Replacement
from cloud.store import Store
from edge_agent.errors import NotFound, Unavailable
from tests.support.cloud import RunningPlane
from tests.test_hostile_callers import DeviceStream, _device, _hello

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Unavailable("the database cannot be used now; try again: down"), "UNAVAILABLE"),
        (NotFound("no device with id 'x'"), "NOT_FOUND"),  # deleted while it was set up
    ],
)
def test_a_setup_whose_claim_fails_leaves_the_device_offline(
    plane: RunningPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: str,
) -> None:
    identity = _device(plane, tmp_path, "pump")
    store: Store = plane.plane.store

    def claim_fails(*args: Any) -> Any:
        raise error

    monkeypatch.setattr(store, "claim_session", claim_fails)
    stream = DeviceStream(plane, identity)
    stream.send(_hello())
    ended = stream.ending()
    stream.close()
    assert ended is not None and ended.code() == getattr(grpc.StatusCode, code), ended
    device_id = identity.info.device_id
    plane.flush_presence()
    record = store.get_device(device_id)
    assert not record.session_open, record
    assert not plane.call(_is_open(plane, device_id))


async def _is_open(running: RunningPlane, device_id: str) -> bool:
    return running.plane.hub.is_open(device_id)


def test_a_failing_check_of_replaced_sessions_does_not_skip_the_revocations(
    plane: RunningPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic recheck ends sessions of devices revoked through another replica even
    when finding replaced sessions fails that round (its error still reaches the job's log)."""
    identity = _device(plane, tmp_path, "pump")
    stream = DeviceStream.accepted(plane, identity)

    async def check_fails(device_ids: Any) -> int:
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(plane.plane.replaced, "check", check_fails)
    # Revoked in the store only, as another replica does: this one learns it at its recheck.
    plane.plane.store.revoke_device(identity.info.device_id, "stolen", utc_now())
    with pytest.raises(RuntimeError, match="a bug in the check"):
        plane.call(plane.plane._recheck_sessions())
    ended = stream.ending()
    stream.close()
    assert ended is not None and ended.code() == grpc.StatusCode.PERMISSION_DENIED, ended


def test_a_claim_that_starts_the_flapping_warns_even_with_nothing_left_here_to_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store counted the replacement that made the device flapping, but the session it
    replaced ended meanwhile: the one warning fleet-wide is still given."""
    caplog.set_level(logging.WARNING, "cloud.service.sessions")

    async def scenario() -> LiveSession:
        hub = SessionHub()
        started = Replacement(flapping=True, started=True, recent=FLAP_REPLACEMENTS + 1)
        return hub.open("d1", peer="ipv4:10.0.0.2:7", generation=5, replacement=started)

    live = asyncio.run(scenario())
    assert live.ending is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "d1" in warnings[0], warnings
    assert "ipv4:10.0.0.2:7" in warnings[0], warnings
