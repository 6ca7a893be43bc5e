"""Applying the control plane's desired model on the device.

For a version not here yet: download the manifest and its signature into the idle slot,
verify the signature with the key pinned at enrollment, choose the variant for this device,
download only the files that variant needs (resuming), check every digest, open and
self-test it. Then, in shadow, compare it with the serving model on the same recent rows
and report; or serve it: switch the slot pointer atomically and restart the data path on it.
A version that is in the other slot already (a rollback) is served from there without a
download, unless that slot was damaged on this device since: then it is installed again, its
damaged files downloaded. Every outcome is reported; the serving model keeps serving whatever
fails. A disk that does not take the install (full, read-only) is reported once and tried
again, its partial downloads deleted meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import hostfacts
from edge_agent import shadow as shadow_eval
from edge_agent.bundle import MANIFEST, SIGNATURE, Manifest, read_signed_manifest, verify_bundle
from edge_agent.config import ModelChoice
from edge_agent.download import Downloader
from edge_agent.enroll import channel_options
from edge_agent.errors import (
    AutoglmError,
    DiskFull,
    IntegrityError,
    LocalStateError,
    ReadOnlyDisk,
    Unavailable,
)
from edge_agent.inference.tensorrt import GpuOutOfMemory
from edge_agent.retry import Backoff
from edge_agent.serving import Hardware, ServingModel, choose
from edge_agent.slots import SlotInfo
from edge_agent.trust import Verifier
from protos.autoglm.v1 import agent_pb2

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)
OUTCOME = agent_pb2.InstallReport.Outcome


def install_report(
    version: str,
    rollout_id: str,
    outcome: int,
    detail: str = "",
    backend: str = "",
    serving: ServingModel | None = None,
    retrying: bool = False,
) -> agent_pb2.AgentMessage:
    """An install report; `retrying`: the disk, not the model, stopped it, and the agent
    tries again by itself (the control plane waits instead of counting a failure)."""
    return agent_pb2.AgentMessage(
        install=agent_pb2.InstallReport(
            model_version=version,
            rollout_id=rollout_id,
            outcome=outcome,  # type: ignore[arg-type]
            detail=detail[:1000],
            backend=backend,
            serving_name=serving.manifest.name if serving else "",
            serving_version=serving.version if serving else "",
            retrying=retrying,
        )
    )


class InstallFailed(Exception):
    def __init__(self, outcome: int, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


class InstallDeferred(Exception):
    """The control plane could not be reached mid-download (a restart, a partition): not
    the device's failure. The parts kept resume when it is back."""


class InstallBlocked(InstallDeferred):
    """This device's disk did not take the install (full, read-only), or its GPU has not the
    memory for the engine now (`gpu`): reported, since only someone on site can free it, and
    tried again with a growing delay."""

    def __init__(self, detail: str, gpu: bool = False) -> None:
        super().__init__(detail)
        self.gpu = gpu


RETRY_DEFERRED_S = 30.0  # an install deferred is tried again after this (or at session open)
# A version the device could not take for its own reason (disk, GPU memory) is tried again
# after RETRY_DEFERRED_S, the delay doubling at each failure up to this.
RETRY_LOCAL_MAX_S = 1800.0
# Tries of a version whose engine the GPU has not the memory for (beside the serving model);
# then it is failed for good, and the rollout counts it.
GPU_MEMORY_TRIES = 5


@dataclasses.dataclass
class ShadowModel:
    model: ServingModel
    info: SlotInfo
    waiting: bool = False  # said in the log that nothing could be compared yet


async def fetch_verified(
    downloader: Downloader,
    directory: Path,
    d: agent_pb2.DesiredState,
    key: Verifier,
    choice: ModelChoice,
) -> Manifest:
    """Into `directory`: the manifest and its signature (checked with the pinned key), then
    the files of the variant this device serves, every digest checked. Raises InstallFailed."""
    try:
        await downloader.fetch(
            [(d.manifest_digest, directory / MANIFEST), (d.signature_digest, directory / SIGNATURE)]
        )
        manifest = await asyncio.to_thread(read_signed_manifest, directory, key)
    except IntegrityError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_VERIFY_FAILED, str(exc)) from None
    except Unavailable as exc:
        raise InstallDeferred(str(exc)) from None
    except LocalStateError as exc:
        raise InstallBlocked(str(exc)) from None
    except AutoglmError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_DOWNLOAD_FAILED, str(exc)) from None
    if (manifest.name, manifest.version) != (d.model_name, d.model_version):
        raise InstallFailed(
            OUTCOME.OUTCOME_VERIFY_FAILED,
            f"the manifest is {manifest.name}:{manifest.version}, the control plane asked "
            f"for {d.model_name}:{d.model_version}",
        )
    try:
        picked = choose(manifest, choice, Hardware.detect())
    except AutoglmError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_VERIFY_FAILED, str(exc)) from None
    needed = dict(manifest.files)
    needed[manifest.golden.file] = manifest.golden.sha256
    needed[picked.variant.file] = picked.variant.sha256
    files = [("sha256:" + digest, directory / name) for name, digest in sorted(needed.items())]
    try:
        await downloader.fetch(files)
        await asyncio.to_thread(verify_bundle, directory, key, True)
    except IntegrityError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_VERIFY_FAILED, str(exc)) from None
    except Unavailable as exc:
        raise InstallDeferred(str(exc)) from None
    except LocalStateError as exc:
        raise InstallBlocked(str(exc)) from None
    except AutoglmError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_DOWNLOAD_FAILED, str(exc)) from None
    return manifest


class ModelUpdater:
    """Applies the latest desired state, one at a time; never raises out of `run`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.config
        self.downloader = Downloader(
            agent.session.address,
            agent.session.credentials(),
            channel_options(agent.session.tls_server_name),
            Backoff(cfg.updates.retry_initial_s, cfg.updates.retry_max_s),
            cfg.updates.download_attempts,
        )
        self.shadow: ShadowModel | None = None
        self.applied: agent_pb2.DesiredState | None = None
        self._wanted: agent_pb2.DesiredState | None = None
        self._ready = asyncio.Event()
        self._before: ServingModel | None = None  # serving when the current apply began
        self._blocked: agent_pb2.DesiredState | None = None  # reported blocked, retrying
        # The version failing for the device's reason, and its consecutive failures: all of
        # them, and those for lack of GPU memory.
        self._failing: tuple[str, str] | None = None
        self._local_failures = 0
        self._gpu_failures = 0
        # Why the disk fault that failed the last swap still holds (None: gone, try again),
        # asked before trying a swap again, which stops the serving data path.
        self._holds: Callable[[], str | None] | None = None

    def want(self, desired: agent_pb2.DesiredState) -> None:
        self._wanted = desired
        self._ready.set()

    def _local_failure(self, d: agent_pb2.DesiredState, gpu: bool) -> tuple[float, bool]:
        """Counts a failure of `d` for the device's reason: the delay before its next try
        (doubling from RETRY_DEFERRED_S up to RETRY_LOCAL_MAX_S), and whether to give up (the
        GPU had not the memory GPU_MEMORY_TRIES times)."""
        key = (d.model_version, d.manifest_digest)
        if self._failing != key:
            self._failing, self._local_failures, self._gpu_failures = key, 0, 0
        self._local_failures += 1
        self._gpu_failures = self._gpu_failures + 1 if gpu else 0
        delay = min(RETRY_DEFERRED_S * 2 ** (self._local_failures - 1), RETRY_LOCAL_MAX_S)
        return delay, self._gpu_failures >= GPU_MEMORY_TRIES

    def _local_done(self) -> None:
        self._failing, self._local_failures, self._gpu_failures = None, 0, 0
        self._holds = None

    def _retry(self, deferred: agent_pb2.DesiredState) -> None:
        """Applies a deferred desired state again, unless a newer one came meanwhile; while
        the disk fault that failed its swap still holds, only later (a swap stops the data
        path to fail again)."""
        if self._wanted is not deferred:
            return
        why = self._holds() if self._holds is not None else None
        if why is not None:
            delay, _ = self._local_failure(deferred, gpu=False)
            log.warning(
                "model %s not tried again yet: %s; checked again in %.0fs",
                deferred.model_version, why, delay,
            )  # fmt: skip
            asyncio.get_running_loop().call_later(delay, self._retry, deferred)
            return
        self._ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        evaluations = asyncio.create_task(self._shadow_loop())
        try:
            while not stop.is_set():
                await self._ready.wait()
                self._ready.clear()
                desired = self._wanted
                if desired is None:
                    continue
                try:
                    await self.apply(desired)
                    self.applied = desired
                except Exception:
                    log.exception("applying the desired model %s failed", desired.model_version)
        finally:
            evaluations.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await evaluations

    def close(self) -> None:
        self._drop_shadow()

    def _report(
        self,
        d: agent_pb2.DesiredState,
        outcome: int,
        detail: str = "",
        backend: str = "",
        retrying: bool = False,
    ) -> None:
        """Reports on `d`, naming the model served when it was applied (`self._before`)."""
        self.agent.session.post(
            install_report(
                d.model_version, d.rollout_id, outcome, detail, backend, self._before, retrying
            )
        )

    def _drop_shadow(self) -> None:
        if self.shadow is not None:
            log.info("shadow model %s stopped", self.shadow.info.version)
            self.shadow.model.close()
            self.shadow = None

    async def apply(self, d: agent_pb2.DesiredState) -> None:
        agent = self.agent
        serving = self._before = agent.model
        if d.revert_version:  # an aborted rollout: only a device serving it goes back
            self._drop_shadow()
            if serving is None or serving.version != d.revert_version:
                log.info(
                    "rollout of %s aborted; %s keeps serving", d.revert_version, _version(serving)
                )
                return
            d = self._revert_target(d)
        if not d.model_version:
            self._drop_shadow()
            return
        if serving is not None and serving.version == d.model_version:
            self._drop_shadow()
            await asyncio.to_thread(agent.slots.drop_parts, agent.slots.idle())
            self._report(d, OUTCOME.OUTCOME_INSTALLED, "serving", serving.choice.label)
            return
        failure = agent.slots.failure(d.manifest_digest) if d.manifest_digest else None
        if failure is not None:
            self._report(d, OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, f"failed before: {failure}")
            return
        if d.shadow and self.shadow is not None and self.shadow.info.version == d.model_version:
            self._report(d, OUTCOME.OUTCOME_INSTALLED, "in shadow", self.shadow.model.choice.label)
            return
        try:
            if d.shadow:
                self._drop_shadow()
                model, info = await self._install(d)
                self.shadow = ShadowModel(model, info)
                log.info("model %s runs in shadow beside %s", d.model_version, _version(serving))
                self._report(d, OUTCOME.OUTCOME_INSTALLED, "in shadow", model.choice.label)
                return
            if self.shadow is not None and self.shadow.info.version == d.model_version:
                model, info = self.shadow.model, self.shadow.info
                self.shadow = None
            elif (found := agent.slots.find(d.model_version, d.manifest_digest)) is not None:
                self._drop_shadow()
                model, info = await self._from_slot(d, found)
            else:
                self._drop_shadow()
                model, info = await self._install(d)
        except InstallFailed as exc:
            log.error("install of %s failed: %s", d.model_version, exc)
            await asyncio.to_thread(agent.slots.drop_parts, agent.slots.idle())
            self._report(d, exc.outcome, str(exc))
            return
        except InstallBlocked as exc:
            await self._install_blocked(d, exc)
            return
        except InstallDeferred as exc:
            # Not reported as a failure: the control plane resends the desired state when
            # the session is back, and the retry below covers a session that stayed up.
            log.warning(
                "install of %s waits for the control plane (%s); resumes within %.0fs",
                d.model_version, exc, RETRY_DEFERRED_S,
            )  # fmt: skip
            asyncio.get_running_loop().call_later(RETRY_DEFERRED_S, self._retry, d)
            return
        previous = agent.slots.read().active
        try:
            await asyncio.to_thread(
                agent.slots.activate, dataclasses.replace(info, rollout_id=d.rollout_id)
            )
        except LocalStateError as exc:  # the pointer stays on what serves
            model.close()
            await self._install_blocked(d, InstallBlocked(str(exc)))
            return
        try:
            await agent.swap(model)
        except Exception as exc:  # noqa: BLE001 - back to what served before, and say so
            model.close()
            # The device's failure (disk, I/O, GPU memory) is not the version's: not
            # remembered as failed, reported as retrying, and tried again, less and less
            # often; a GPU that had not the memory for it GPU_MEMORY_TRIES times is failed.
            local = isinstance(exc, LocalStateError)
            delay, give_up = self._local_failure(d, isinstance(exc, GpuOutOfMemory))
            detail = str(exc)
            if give_up:
                detail = f"{exc}; {_NO_FIT} ({GPU_MEMORY_TRIES} tries)"
            try:
                agent.slots.fall_back(detail, lasting=not local or give_up)
            except LocalStateError as why:  # a restart tries the slot again, then falls back
                log.error("cannot point the model slots back at %s: %s", previous, why)
            log.error("model %s failed at start (%s); back to %s", info.version, detail, previous)
            if not local or give_up:
                self._local_done()
                self._report(d, OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, detail)
                return
            if self._blocked is not d:
                self._blocked = d
                detail = f"{exc}; tried again in {delay:.0f}s, then less often"
                self._report(d, OUTCOME.OUTCOME_START_FAILED_ROLLED_BACK, detail, retrying=True)
            self._holds = _disk_fault_check(exc, agent.config.state_dir)
            asyncio.get_running_loop().call_later(delay, self._retry, d)
            return
        self._blocked = None
        self._local_done()
        log.info("now serving %s from slot %s", info.version, info.slot)
        self._report(
            d, OUTCOME.OUTCOME_INSTALLED, f"serving from slot {info.slot}", model.choice.label
        )

    async def _install_blocked(self, d: agent_pb2.DesiredState, exc: InstallBlocked) -> None:
        """Frees what the install took (its partial downloads), reports once per desired
        state, and tries again later (`_local_failure`); a version the GPU had not the memory
        for GPU_MEMORY_TRIES times is reported failed instead."""
        slots = self.agent.slots
        freed = await asyncio.to_thread(slots.drop_parts, slots.idle())
        delay, give_up = self._local_failure(d, exc.gpu)
        if give_up:  # the GPU had not the memory for it, each time: the version's failure
            self._local_done()
            detail = f"{exc}; {_NO_FIT} ({GPU_MEMORY_TRIES} tries)"
            log.error("install of %s failed: %s", d.model_version, detail)
            self._report(d, OUTCOME.OUTCOME_SELF_TEST_FAILED, detail)
            return
        detail = f"{exc}; tried again in {delay:.0f}s, then less often"
        if freed:
            detail += f" ({freed} bytes of partial downloads deleted)"
        log.error("install of %s cannot go on: %s", d.model_version, detail)
        if self._blocked is not d:
            self._blocked = d
            outcome = OUTCOME.OUTCOME_DOWNLOAD_FAILED
            if exc.gpu:
                outcome = OUTCOME.OUTCOME_SELF_TEST_FAILED
            self._report(d, outcome, detail, retrying=True)
        asyncio.get_running_loop().call_later(delay, self._retry, d)

    def _revert_target(self, d: agent_pb2.DesiredState) -> agent_pb2.DesiredState:
        """What to go back to: the version asked for when a slot holds it (or it can be
        downloaded), else whatever the previous slot holds."""
        slots = self.agent.slots
        if d.model_version and (
            slots.find(d.model_version, d.manifest_digest) or d.signature_digest
        ):
            return d
        previous = slots.read().previous
        if previous is None:
            return d  # nothing local to go back to: the normal path reports why
        back = agent_pb2.DesiredState()
        back.CopyFrom(d)
        back.model_name, back.model_version = previous.name, previous.version
        back.manifest_digest = previous.manifest_digest
        return back

    async def _from_slot(
        self, d: agent_pb2.DesiredState, found: SlotInfo
    ) -> tuple[ServingModel, SlotInfo]:
        """`d`, which the slot of `found` holds already (a rollback): opened there. A slot
        damaged on this device (`Agent._slot_damage`: a file changed since its install, now
        deleted, or missing) is installed again, which keeps its intact files and downloads
        the others; without the digests to download them, the install fails saying why."""
        agent = self.agent
        try:
            return await _open_checked(agent, agent.slots.slot_dir(found.slot)), found
        except InstallFailed as exc:
            damage = await asyncio.to_thread(agent._slot_damage, found)
            if damage is None:
                raise
            if not d.manifest_digest or not d.signature_digest:
                raise InstallFailed(
                    exc.outcome,
                    f"{exc} ({damage}); the control plane gave no digests to download it again",
                ) from None
            log.warning(
                "model %s in slot %s does not open (%s: %s); installed again",
                d.model_version, found.slot, exc, damage,
            )  # fmt: skip
        return await self._install(d)

    async def _install(self, d: agent_pb2.DesiredState) -> tuple[ServingModel, SlotInfo]:
        """Download, verify and self-test `d` in the idle slot (the serving one is untouched)."""
        agent = self.agent
        if not d.manifest_digest or not d.signature_digest:
            raise InstallFailed(
                OUTCOME.OUTCOME_DOWNLOAD_FAILED,
                f"{d.model_version} is not on this device and the control plane gave no digests",
            )
        slot = agent.slots.idle()
        try:
            directory = await asyncio.to_thread(agent.slots.prepare, slot, d.manifest_digest)
        except LocalStateError as exc:
            raise InstallBlocked(str(exc)) from None
        choice = agent.config.model
        manifest = await fetch_verified(self.downloader, directory, d, agent.key, choice)
        model = await _open_checked(agent, directory)
        info = SlotInfo(slot, manifest.name, manifest.version, d.manifest_digest, d.rollout_id)
        return model, info

    # ---- shadow ----
    async def _shadow_loop(self) -> None:
        while True:
            await asyncio.sleep(self.agent.config.shadow.interval_s)
            current = self.shadow
            if current is None or self.agent.model is None:
                continue
            try:
                report = await asyncio.to_thread(self._evaluate, current)
            except Exception:
                log.exception("shadow evaluation of %s failed", current.info.version)
                continue
            if report is not None and self.shadow is current:
                self.agent.session.post(agent_pb2.AgentMessage(shadow=report))

    def _evaluate(self, current: ShadowModel) -> agent_pb2.ShadowReport | None:
        """The comparison of `current` with the serving model on the recent rows. None when
        it measured nothing only because the rows are too few yet (the rows are kept in
        memory: after a restart there are none): a report of 0 windows moves nothing on the
        control plane. A candidate that cannot be compared with the serving model
        (`shadow.compatible`) is reported with why, though it measured nothing."""
        incumbent = self.agent.model
        runtime = self.agent.runtime
        assert incumbent is not None
        why = shadow_eval.compatible(current.model, incumbent)
        parts = []
        if not why:
            for runner in runtime.runners:
                series = runner.history.series(incumbent.spec.period_s)
                if series is None:
                    continue
                result = shadow_eval.compare(
                    current.model, incumbent, series, runtime.run_on_inference_thread
                )
                if result is not None:
                    parts.append(result)
        merged = shadow_eval.merge(parts)
        if merged is None and not why:
            if not current.waiting:
                current.waiting = True
                log.info(
                    "shadow %s: too few recent rows to compare it with %s yet; reported once "
                    "there are",
                    current.info.version,
                    incumbent.version,
                )
            return None
        current.waiting = False
        if merged is not None:
            log.info(
                "shadow %s vs %s: %d windows, agreement %.3f, alert rate %.3f vs %.3f",
                current.info.version,
                incumbent.version,
                merged.windows,
                merged.agreement,
                merged.rate_candidate,
                merged.rate_incumbent,
            )
        return shadow_eval.report(
            current.info.rollout_id, current.info.version, incumbent.version, merged, why
        )


async def _open_checked(agent: Agent, directory: Path) -> ServingModel:
    """Opens and self-tests an install slot; a disk that does not take what opening writes
    (a TensorRT engine) blocks the install, anything else fails it."""
    try:
        return await asyncio.to_thread(agent._open, directory, True)
    except LocalStateError as exc:
        raise InstallBlocked(str(exc), gpu=isinstance(exc, GpuOutOfMemory)) from None
    except AutoglmError as exc:
        raise InstallFailed(OUTCOME.OUTCOME_SELF_TEST_FAILED, str(exc)) from None


_NO_FIT = "it does not fit in GPU memory beside the serving model"


def _disk_fault_check(error: Exception, state_dir: Path) -> Callable[[], str | None] | None:
    """For a full or read-only disk (`DiskFull`, `ReadOnlyDisk`), a cheap check of
    whether it still is: a full one while the free space at `state_dir` is no more than at
    the failure, a read-only one while `state_dir` cannot be written. None for other faults."""
    if isinstance(error, DiskFull):
        free_then = hostfacts.disk_free_bytes(state_dir)

        def full() -> str | None:
            free = hostfacts.disk_free_bytes(state_dir)
            if free > free_then:
                return None
            return f"the disk is still full ({free} bytes free at {state_dir})"

        return full
    if isinstance(error, ReadOnlyDisk):

        def read_only() -> str | None:
            try:
                flags = os.statvfs(state_dir).f_flag
            except OSError:
                flags = 0
            if flags & os.ST_RDONLY or not os.access(state_dir, os.W_OK):
                return f"{state_dir} is still read-only"
            return None

        return read_only
    return None


def _version(model: ServingModel | None) -> str:
    return model.version if model is not None else "no model"
