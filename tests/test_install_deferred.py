"""A download the control plane breaks off (a restart, a partition) defers the install
instead of failing it: a control-plane restart is not a device failure. A refusal or bad
bytes still fail it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_agent.config import ModelChoice
from edge_agent.errors import IntegrityError, PermissionDenied, Unavailable
from edge_agent.updates import OUTCOME, InstallDeferred, InstallFailed, fetch_verified
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit


class Broken:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def fetch(self, files: object) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "expected", "outcome"),
    [
        (Unavailable("cannot reach cp:7444: nothing is listening there"), InstallDeferred, None),
        (PermissionDenied("not assigned"), InstallFailed, OUTCOME.OUTCOME_DOWNLOAD_FAILED),
        (IntegrityError("bytes hash to x"), InstallFailed, OUTCOME.OUTCOME_VERIFY_FAILED),
    ],
)
def test_only_an_unreachable_control_plane_defers(
    tmp_path: Path, error: Exception, expected: type[Exception], outcome: int | None
) -> None:
    desired = agent_pb2.DesiredState(
        model_name="pump", model_version="2", manifest_digest="sha256:a",
        signature_digest="sha256:b",
    )  # fmt: skip
    with pytest.raises(expected) as raised:
        asyncio.run(
            fetch_verified(Broken(error), tmp_path, desired, object(), ModelChoice())  # type: ignore[arg-type]
        )
    if outcome is not None:
        assert raised.value.outcome == outcome  # type: ignore[attr-defined]
