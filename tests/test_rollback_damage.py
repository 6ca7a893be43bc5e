"""A rollback to a version whose slot was damaged on this device.

When the version asked for is in the previous slot already, the updater opens it there
without a download. A file of that slot whose bytes changed since its install (a flipped bit)
made every such rollback fail its self-test, and nothing ever downloaded the file again. Now
the slot is checked as at start (`Agent._slot_damage`): a damaged slot is installed again,
keeping its intact files and downloading the damaged one; a slot whose files are as installed
still fails as before.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.domain import DesiredModel
from edge_agent.agent import Agent
from edge_agent.slots import ModelSlots
from edge_agent.updates import OUTCOME
from protos.autoglm.v1 import agent_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.bundles import make_version
from tests.support.cloud import RunningPlane
from tests.support.slot_installs import (
    MODEL_FILE,
    agent_config,
    apply,
    close,
    desired,
    flip_a_bit,
    install,
)

# The module trains the small model first: minutes on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def _rolled_back_from_2(
    plane: RunningPlane, tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> tuple[Agent, dict[str, Path]]:
    """An agent serving version 2 from slot b, version 1 in its previous slot a, both
    versions pushed to the control plane, which wants version 1 back on the device (the
    rollout of 2 aborted)."""
    fleet_key = plane.plane.secrets.signing_key
    state = tmp_path / "edge"
    identity = enroll_identity(register(plane, "pump-1"), state)
    slots = ModelSlots(state / "models")
    bundles = {v: make_version(trained, tmp_path / f"v{v}", v, fleet_key) for v in ("1", "2")}
    with plane.client() as client:
        for bundle in bundles.values():
            client.push_bundle(bundle)
    install(slots, "a", bundles["1"], "1")
    install(slots, "b", bundles["2"], "2")
    back = _revert(desired(bundles["1"], "1"))
    digests = back.manifest_digest, back.signature_digest
    plane.plane.store.set_desired(
        [
            DesiredModel(
                identity.info.device_id, "pump", "1", *digests, back.rollout_id, False,
                dt.datetime.now(dt.UTC), revert_version="2",
            )
        ]
    )  # fmt: skip
    return Agent(agent_config(state)), bundles


def _revert(wanted: agent_pb2.DesiredState) -> agent_pb2.DesiredState:
    """`wanted` as an aborted rollout of version 2 sends it."""
    back = agent_pb2.DesiredState()
    back.CopyFrom(wanted)
    back.revert_version = "2"
    return back


def test_a_damaged_previous_slot_is_installed_again_on_rollback(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    agent, bundles = _rolled_back_from_2(plane, tmp_path, trained)
    try:
        assert agent.model is not None and agent.model.version == "2"
        damaged = agent.slots.slot_dir("a") / MODEL_FILE
        flip_a_bit(damaged)

        posted = apply(agent, _revert(desired(bundles["1"], "1")))
        assert [(r.model_version, r.outcome) for r in posted] == [
            ("1", OUTCOME.OUTCOME_INSTALLED)
        ], posted
        assert agent.model is not None and agent.model.version == "1"
        active = agent.slots.read().active
        assert active is not None and (active.slot, active.version) == ("a", "1"), active
        assert damaged.read_bytes() == (bundles["1"] / MODEL_FILE).read_bytes()
        size = damaged.stat().st_size
        received = agent.updater.downloader.received_bytes
        assert received == size, f"downloaded {received} bytes, the damaged file has {size}"
        assert agent.slots.read().failed == {}, agent.slots.read()
    finally:
        close(agent)


def test_a_damaged_previous_slot_without_digests_fails_saying_why(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    """The control plane did not have version 1 to name its digests: the slot cannot be
    downloaded again, and the report says the slot is damaged, not only that it failed."""
    agent, _ = _rolled_back_from_2(plane, tmp_path, trained)
    try:
        flip_a_bit(agent.slots.slot_dir("a") / MODEL_FILE)
        wanted = agent_pb2.DesiredState(
            model_name="pump", model_version="1", rollout_id="r2", revert_version="2"
        )
        [report] = apply(agent, wanted)
        assert report.outcome == OUTCOME.OUTCOME_SELF_TEST_FAILED, report
        assert "damaged on this device" in report.detail, report.detail
        assert "no digests" in report.detail, report.detail
        assert agent.model is not None and agent.model.version == "2"
    finally:
        close(agent)


def test_a_previous_slot_as_installed_that_fails_is_not_downloaded_again(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its files are as installed: the failure is the bundle's (here its self-test on this
    device's runtime), reported as before, and nothing is downloaded."""
    from edge_agent import serving
    from edge_agent.errors import IntegrityError

    agent, bundles = _rolled_back_from_2(plane, tmp_path, trained)
    try:

        def fails(*args: Any, **kwargs: Any) -> str:
            raise IntegrityError("variant fp32 fails the self-test")

        monkeypatch.setattr(serving, "check_golden", fails)
        [report] = apply(agent, _revert(desired(bundles["1"], "1")))
        assert report.outcome == OUTCOME.OUTCOME_SELF_TEST_FAILED, report
        assert report.detail == "variant fp32 fails the self-test", report.detail
        assert agent.updater.downloader.received_bytes == 0
        assert agent.model is not None and agent.model.version == "2"
        previous = agent.slots.read().previous
        assert previous is not None and previous.version == "1", previous
    finally:
        close(agent)
