"""A model slot damaged on this device is the device's fault, not the version's.

A slot's files were verified when it was installed; at start a file whose bytes changed since
(a flipped bit, a foreign edit), or a signature that fails only because the signing root kept
here could not be read, must not fail the version for good. Before, the digest mismatch was
an IntegrityError like a bad bundle's: the version was remembered as failed, every later
desired state for it answered "failed before", and the download step kept the damaged file
(it skipped any file already there), so even a fresh install would fail verification.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from cloud.domain import DesiredModel
from edge_agent.agent import Agent
from edge_agent.bundle import MANIFEST
from edge_agent.download import CHUNK, Downloader
from edge_agent.retry import Backoff
from edge_agent.slots import ModelSlots
from edge_agent.trust import ROOT_FILE, sign_root
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
    digest,
    flip_a_bit,
    install,
)

# The module trains the small model first: minutes on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def fleet_key(plane: RunningPlane) -> ed25519.Ed25519PrivateKey:
    return plane.plane.secrets.signing_key


def test_a_bit_flipped_in_the_serving_slot_is_downloaded_again_not_failed_for_good(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    fleet_key: ed25519.Ed25519PrivateKey,
) -> None:
    state = tmp_path / "edge"
    identity = enroll_identity(register(plane, "pump-1"), state)
    slots = ModelSlots(state / "models")
    bundles = {v: make_version(trained, tmp_path / f"v{v}", v, fleet_key) for v in ("1", "2")}
    with plane.client() as client:
        for bundle in bundles.values():
            client.push_bundle(bundle)
    install(slots, "a", bundles["1"], "1")
    install(slots, "b", bundles["2"], "2")
    wanted = desired(bundles["2"], "2")
    device, now = identity.info.device_id, dt.datetime.now(dt.UTC)
    digests = wanted.manifest_digest, wanted.signature_digest
    plane.plane.store.set_desired([DesiredModel(device, "pump", "2", *digests, "r2", False, now)])
    damaged = slots.slot_dir("b") / MODEL_FILE
    flip_a_bit(damaged)

    agent = Agent(agent_config(state))
    try:
        assert agent.model is not None and agent.model.version == "1"
        pointer = agent.slots.read()
        assert pointer.failed == {}, f"the disk's damage is held against the version: {pointer}"
        assert not damaged.exists(), "the damaged file is kept"
        [report] = [m.install for m in agent.pending_reports]
        assert report.model_version == "2" and report.retrying, report
        assert report.outcome == OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, report
        assert "damaged on this device" in report.detail, report.detail

        # The next desired state installs it again, downloading the damaged file anew.
        posted = apply(agent, wanted)
        assert [r.outcome for r in posted] == [OUTCOME.OUTCOME_INSTALLED], posted
        assert agent.model is not None and agent.model.version == "2"
        active = agent.slots.read().active
        assert active is not None and active.version == "2", active
        served = agent.slots.slot_dir(active.slot) / MODEL_FILE
        assert served.read_bytes() == (bundles["2"] / MODEL_FILE).read_bytes()
    finally:
        close(agent)


def test_slots_signed_by_a_rotated_key_are_not_failed_when_the_root_cannot_be_read(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    fleet_key: ed25519.Ed25519PrivateKey,
) -> None:
    """The fleet rotated its signing key (a root lists the old and the new one) and both
    slots hold bundles signed by the new key; the root kept here is then damaged: only the
    key pinned at enrollment is trusted, so neither slot verifies. That is the device's
    state, not the bundles': neither version is failed, no file is deleted, and once the
    control plane hands the root again the slots verify."""
    state = tmp_path / "edge"
    enroll_identity(register(plane, "pump-1"), state)
    new_key = ed25519.Ed25519PrivateKey.generate()
    root = sign_root(
        2,
        dt.datetime.now(dt.UTC) + dt.timedelta(days=30),
        [fleet_key.public_key(), new_key.public_key()],
        [fleet_key, new_key],
    )
    (state / "trust").mkdir()
    (state / "trust" / ROOT_FILE).write_bytes(root[: len(root) // 2])  # torn
    slots = ModelSlots(state / "models")
    for slot, version in (("a", "1"), ("b", "2")):
        bundle = make_version(trained, tmp_path / f"v{version}", version, new_key)
        install(slots, slot, bundle, version)
    files = sorted(p.relative_to(state) for p in (state / "models").rglob("*") if p.is_file())

    agent = Agent(agent_config(state))
    try:
        assert agent.model is None
        assert agent.slots.read().failed == {}, agent.slots.read()
        reports = [m.install for m in agent.pending_reports]
        assert [(r.model_version, r.retrying) for r in reports] == [("2", True), ("1", True)]
        assert "could not be read" in reports[0].detail, reports[0].detail
        now = sorted(p.relative_to(state) for p in (state / "models").rglob("*") if p.is_file())
        assert [f for f in files if f not in now] == [], "files of intact slots deleted"
        assert agent.key.take(root, dt.datetime.now(dt.UTC))
        for slot in ("a", "b"):
            agent._open(agent.slots.slot_dir(slot), partial=True).close()
    finally:
        close(agent)


def test_a_bundle_that_fails_its_self_test_at_start_is_still_failed(
    plane: RunningPlane,
    tmp_path: Path,
    trained: tuple[Path, ed25519.Ed25519PrivateKey],
    fleet_key: ed25519.Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slot's files are as installed and its signature verifies: the failure is the
    bundle's (here its self-test, on this device's runtime), remembered as before."""
    from edge_agent import serving
    from edge_agent.errors import IntegrityError

    state = tmp_path / "edge"
    enroll_identity(register(plane, "pump-1"), state)
    slots = ModelSlots(state / "models")
    bundle = make_version(trained, tmp_path / "v2", "2", fleet_key)
    install(slots, "b", bundle, "2")

    def fails(*args: Any, **kwargs: Any) -> str:
        raise IntegrityError("variant fp32 fails the self-test")

    monkeypatch.setattr(serving, "check_golden", fails)
    agent = Agent(agent_config(state))
    try:
        assert agent.model is None
        failed = agent.slots.failure(digest((bundle / MANIFEST).read_bytes()))
        assert failed == "variant fp32 fails the self-test"
        assert (slots.slot_dir("b") / MODEL_FILE).is_file()
        [report] = [m.install for m in agent.pending_reports]
        assert not report.retrying, report
    finally:
        close(agent)


# ---- the download step ----


class Artifacts:
    """DownloadArtifact over the given blobs; the digests asked for are kept."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = {digest(b): b for b in blobs}
        self.asked: list[str] = []

    def DownloadArtifact(self, request: Any) -> AsyncIterator[agent_pb2.ArtifactChunk]:
        self.asked.append(request.digest)
        data = self.blobs[request.digest]

        async def chunks() -> AsyncIterator[agent_pb2.ArtifactChunk]:
            for offset in range(request.offset, len(data), CHUNK):
                yield agent_pb2.ArtifactChunk(
                    offset=offset, data=data[offset : offset + CHUNK], total_size=len(data)
                )

        return chunks()


@pytest.fixture
def downloader() -> Iterator[Downloader]:
    yield Downloader("stub", None, [], Backoff(0.01, 0.02), 2, free=lambda _: 1 << 40)  # type: ignore[arg-type]


@pytest.mark.unit
def test_a_file_already_there_is_kept_only_when_its_bytes_match(
    tmp_path: Path, downloader: Downloader
) -> None:
    good, other = b"model bytes" * 1000, b"golden bytes" * 100
    artifacts = Artifacts([good, other])
    kept, damaged = tmp_path / "golden.npz", tmp_path / MODEL_FILE
    kept.write_bytes(other)
    damaged.write_bytes(good[:-1] + b"X")
    files = [(digest(good), damaged), (digest(other), kept)]
    asyncio.run(downloader.fetch_from(artifacts, files))  # type: ignore[arg-type]
    assert damaged.read_bytes() == good, "a damaged file was kept instead of downloaded again"
    assert artifacts.asked == [digest(good)], "an intact file was downloaded again"
    assert not list(tmp_path.glob("*.part"))
