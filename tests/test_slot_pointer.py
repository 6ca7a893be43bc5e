"""A damaged model slot pointer (models/active.json) does not stop the agent.

Before, ModelSlots.read raised LocalStateError out of Agent.__init__: the agent did not start,
so site alerting stopped too, and the remedy it suggested ("move it away") then served
without either verified slot. Now the pointer is rebuilt at start from the slots that verify
as at install (marker, signed manifest, file digests), the damaged file is kept aside under a
name the log gives, and the slot installed first serves (the other may have been a candidate
only run in shadow: it serves once the control plane asks for it, without a download).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.agent import Agent
from edge_agent.errors import LocalStateError
from edge_agent.slots import POINTER, TARGET, ModelSlots
from edge_agent.updates import OUTCOME
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
DAMAGED = b'{"active": {"slot": "b", "name": "pu\x00\x00\x00'  # torn mid-write, bit rot


def _two_slots(
    plane: RunningPlane, tmp_path: Path, trained: tuple[Path, ed25519.Ed25519PrivateKey]
) -> tuple[Path, ModelSlots, dict[str, Path]]:
    """Version 1 installed in slot a, then 2 in slot b (serving, 1 previous)."""
    state = tmp_path / "edge"
    enroll_identity(register(plane, "pump-1"), state)
    slots = ModelSlots(state / "models")
    key = plane.plane.secrets.signing_key
    bundles = {v: make_version(trained, tmp_path / f"v{v}", v, key) for v in ("1", "2")}
    install(slots, "a", bundles["1"], "1")
    install(slots, "b", bundles["2"], "2")
    began = (slots.slot_dir("b") / TARGET).stat().st_mtime
    os.utime(slots.slot_dir("a") / TARGET, (began - 3600, began - 3600))  # an hour before
    return state, slots, bundles


def test_a_damaged_pointer_is_rebuilt_from_the_slots_and_kept_aside(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, slots, bundles = _two_slots(plane, tmp_path, trained)
    (slots.root / POINTER).write_bytes(DAMAGED)

    with caplog.at_level(logging.ERROR, "edge_agent.slots"):
        agent = Agent(agent_config(state))
    try:
        assert agent.model is not None and agent.model.version == "1"
        pointer = agent.slots.read()
        assert pointer.active is not None and pointer.active.slot == "a", pointer
        assert pointer.active.manifest_digest == desired(bundles["1"], "1").manifest_digest
        [aside] = slots.root.glob(f"{POINTER}.damaged-*")
        assert aside.read_bytes() == DAMAGED, "the damaged pointer is not kept as it was"
        logged = [r.getMessage() for r in caplog.records if aside.name in r.getMessage()]
        assert logged, f"the log does not name {aside.name}: {caplog.text}"
        assert "slot a (pump:1) serves" in logged[0] and "slot b (pump:2)" in logged[0]

        # Asked for again, version 2 serves from its slot's files: nothing is downloaded.
        posted = apply(agent, desired(bundles["2"], "2"))
        assert [r.outcome for r in posted] == [OUTCOME.OUTCOME_INSTALLED], posted
        assert agent.model is not None and agent.model.version == "2"
        assert agent.updater.downloader.received_bytes == 0
    finally:
        close(agent)


def test_a_slot_that_does_not_verify_is_left_out_of_the_rebuilt_pointer(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    state, slots, _ = _two_slots(plane, tmp_path, trained)
    flip_a_bit(slots.slot_dir("a") / MODEL_FILE)
    (slots.root / POINTER).write_bytes(DAMAGED)

    agent = Agent(agent_config(state))
    try:
        assert agent.model is not None and agent.model.version == "2"
        assert agent.slots.read().active is not None
        assert agent.slots.read().active.slot == "b"  # type: ignore[union-attr]
    finally:
        close(agent)


def test_without_a_slot_that_verifies_the_agent_starts_without_a_model(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
) -> None:
    state, slots, _ = _two_slots(plane, tmp_path, trained)
    for slot in ("a", "b"):
        (slots.slot_dir(slot) / "manifest.sig").write_bytes(b"\x00" * 64)
    (slots.root / POINTER).write_bytes(DAMAGED)

    agent = Agent(agent_config(state))
    try:
        assert agent.model is None
        assert agent.slots.read().active is None
        assert (slots.slot_dir("a") / MODEL_FILE).is_file(), "a slot's files were deleted"
    finally:
        close(agent)


def test_a_pointer_the_disk_cannot_read_now_is_not_rebuilt(tmp_path: Path) -> None:
    """EIO, EMFILE, EACCES: the disk's fault, not the pointer's content. It is raised as is;
    moving a good pointer aside would serve the first-installed slot (a silent rollback) and
    lose the record of failed versions."""
    slots = ModelSlots(tmp_path / "models")
    (slots.root / "active.json").write_text('{"active": null, "previous": null, "failed": {}}')
    with (
        mock.patch.object(Path, "read_text", side_effect=OSError(errno.EIO, "I/O error")),
        pytest.raises(LocalStateError, match="cannot be read now"),
    ):
        slots.recover(key=None)  # type: ignore[arg-type]  # never reached: nothing verifies
    assert not list(slots.root.glob("active.json.damaged-*"))
