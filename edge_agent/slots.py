"""A/B install slots for models, so a device always has a verified model to serve.

    STATE_DIR/models/slot-a/, slot-b/   bundle files (manifest.json, manifest.sig, ...)
    STATE_DIR/models/active.json        which slot serves, which served before, what failed

A new version goes into the idle slot (never the serving one); `activate` then replaces
`active.json` atomically (write, fsync, rename, fsync the directory), so a power cut leaves
either the old pointer or the new one, and both name a slot that was verified. Before the
idle slot is overwritten it stops being "previous", so the pointer never names a slot being
written. A pointer damaged all the same (bit rot, a foreign edit) is rebuilt at start from
the slots' `.target` markers and signed manifests (`ModelSlots.recover`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.bundle import (
    MANIFEST,
    Manifest,
    bundle_paths,
    parse_manifest,
    read_signed_manifest,
    sha256_file,
    verify_bundle,
)
from edge_agent.errors import AutoglmError, IntegrityError, LocalStateError
from edge_agent.files import (
    UNREADABLE,
    make_dir_durably,
    remove_durably,
    replace_atomically,
    write_failure,
)
from edge_agent.trust import Verifier

log = logging.getLogger(__name__)
POINTER = "active.json"
TARGET = ".target"  # in a slot: the manifest digest being installed there
PART = ".part"  # a download's bytes so far (edge_agent.download)


class DamagedPointer(LocalStateError):
    """The slot pointer's content is not a pointer (torn, bad JSON, wrong shape): `recover`
    rebuilds it. An error reading the file (the disk's) is a plain LocalStateError."""


@dataclass(frozen=True)
class SlotInfo:
    slot: str  # "a" | "b"
    name: str
    version: str
    manifest_digest: str
    rollout_id: str = ""


@dataclass(frozen=True)
class Pointer:
    active: SlotInfo | None = None
    previous: SlotInfo | None = None
    failed: dict[str, str] | None = None  # manifest digest -> why it failed at start

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "active": asdict(self.active) if self.active else None,
                "previous": asdict(self.previous) if self.previous else None,
                "failed": self.failed or {},
            },
            indent=1,
        ).encode()


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = root
        make_dir_durably(root)

    def slot_dir(self, slot: str) -> Path:
        return self.root / f"slot-{slot}"

    def read(self) -> Pointer:
        path = self.root / POINTER
        try:
            doc = json.loads(path.read_text())
            return Pointer(
                active=SlotInfo(**doc["active"]) if doc.get("active") else None,
                previous=SlotInfo(**doc["previous"]) if doc.get("previous") else None,
                failed=dict(doc.get("failed") or {}),
            )
        except FileNotFoundError:
            return Pointer()
        except OSError as exc:  # the disk, not the file's content: nothing to rebuild
            raise LocalStateError(f"{path}: cannot be read now ({exc})") from None
        except UNREADABLE as exc:
            raise DamagedPointer(
                f"{path}: unreadable ({exc}); rebuilt from the slots at the next start"
            ) from None

    def recover(self, key: Verifier) -> None:
        """At start: a pointer that cannot be read (damaged) is kept aside, named in the log,
        and rebuilt from the slots that verify as at install (`_installed`). The one installed
        first serves: the other may be a candidate only ever run in shadow, so it serves only
        when the control plane asks for it again (its files are kept: no download then).
        `LocalStateError` when the disk does not take the rebuilt pointer."""
        path = self.root / POINTER
        try:
            self.read()
            return
        except DamagedPointer as exc:  # an error reading it (EIO, EMFILE...) is raised as is
            damaged = exc
        installed = [self._installed(slot, key) for slot in ("a", "b")]
        found = sorted((i for i in installed if i is not None), key=lambda i: i[0])
        pointer = Pointer(active=found[0][1] if found else None)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{POINTER}.damaged-{stamp}")
        try:
            try:  # a link keeps a pointer in place until the rebuilt one replaces it
                os.link(path, aside)
            except OSError:
                os.replace(path, aside)
        except OSError as exc:
            raise LocalStateError(f"{damaged}; cannot move it aside to rebuild it: {exc}") from None
        self._write(pointer)
        served = "no slot verifies: no model serves"
        if pointer.active is not None:
            served = f"slot {pointer.active.slot} ({pointer.active.name}:"
            served += f"{pointer.active.version}) serves"
        later = ", ".join(f"slot {i.slot} ({i.name}:{i.version})" for _, i in found[1:])
        if later:
            served += f"; {later}, installed after it, serves when the control plane asks again"
        log.error(
            "%s; kept as %s and rebuilt from the slots that verify: %s (the record of versions "
            "that failed here is lost)",
            damaged, aside.name, served,
        )  # fmt: skip

    def _installed(self, slot: str, key: Verifier) -> tuple[float, SlotInfo] | None:
        """The install in `slot`, checked as at install (its marker names the manifest there,
        whose signature verifies, every file present matches it, a variant among them), with
        when it began (its marker's time); None when it has none or does not verify."""
        directory = self.slot_dir(slot)
        marker = directory / TARGET
        try:
            digest = marker.read_text().strip()
            began = marker.stat().st_mtime
            raw = (directory / MANIFEST).read_bytes()
            if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
                raise IntegrityError(f"{directory / MANIFEST} is not the one {marker} names")
            manifest = verify_bundle(directory, key, partial=True)
            if not any((directory / v.file).is_file() for v in manifest.variants):
                raise IntegrityError(f"{directory}: no variant downloaded")
        except FileNotFoundError:
            return None  # never installed, or an install that had not begun
        except (OSError, UnicodeDecodeError, AutoglmError) as exc:
            log.warning("slot %s cannot serve after the pointer was lost: %s", slot, exc)
            return None
        return began, SlotInfo(slot, manifest.name, manifest.version, digest)

    def _write(self, pointer: Pointer) -> None:
        """Replaces the pointer durably; `LocalStateError` (the old one stays) when the disk
        does not take it."""
        path = self.root / POINTER
        try:
            replace_atomically(path, pointer.to_json(), 0o644)
        except OSError as exc:
            raise write_failure(path, exc) from None

    def idle(self) -> str:
        active = self.read().active
        return "b" if active is not None and active.slot == "a" else "a"

    def find(self, version: str, manifest_digest: str = "") -> SlotInfo | None:
        """The active or previous slot holding that version (and digest, when given)."""
        pointer = self.read()
        for info in (pointer.active, pointer.previous):
            if (
                info is not None
                and info.version == version
                and (not manifest_digest or info.manifest_digest == manifest_digest)
            ):
                return info
        return None

    def prepare(self, slot: str, manifest_digest: str) -> Path:
        """The idle slot's directory, ready to receive `manifest_digest`: files of an
        interrupted install of the same digest stay (downloads resume), anything else goes.
        `LocalStateError` when the disk does not take it (full, read-only)."""
        pointer = self.read()
        if pointer.active is not None and pointer.active.slot == slot:
            raise LocalStateError(f"slot {slot} is serving; install into the idle slot")
        if pointer.previous is not None and pointer.previous.slot == slot:
            self._write(Pointer(pointer.active, None, pointer.failed))
        directory = self.slot_dir(slot)
        marker = directory / TARGET
        try:
            if not (marker.is_file() and marker.read_text() == manifest_digest):
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(directory)
                make_dir_durably(directory)  # also makes the removal durable
                replace_atomically(marker, manifest_digest.encode(), 0o644)
        except OSError as exc:
            raise write_failure(directory, exc, "prepare the install slot") from None
        return directory

    def drop_parts(self, slot: str) -> int:
        """Deletes the partial downloads in the idle `slot` (an install that stopped on a
        full disk must not keep it full); returns the bytes freed. Never raises: a part
        that cannot go is logged."""
        freed = 0
        for part in sorted(self.slot_dir(slot).glob(f"*{PART}")):
            try:
                size = part.stat().st_size
                remove_durably(part)
            except OSError as exc:
                log.warning("%s: cannot delete this partial download: %s", part, exc)
                continue
            freed += size
        return freed

    def activate(self, info: SlotInfo) -> None:
        """Makes `info.slot` the serving slot; the one serving before becomes previous."""
        pointer = self.read()
        previous = pointer.active if pointer.active and pointer.active.slot != info.slot else None
        failed = dict(pointer.failed or {})
        failed.pop(info.manifest_digest, None)
        self._write(Pointer(info, previous, failed))
        log.info("slot %s now serves %s:%s", info.slot, info.name, info.version)

    def fall_back(self, reason: str, lasting: bool = True) -> SlotInfo | None:
        """The active slot failed at start: serve the previous one; remember the failure,
        unless it is not `lasting` (a full disk, a broken engine cache: not the model's
        fault), so the version is installed again when asked."""
        pointer = self.read()
        failed = dict(pointer.failed or {})
        if pointer.active is not None and lasting:
            failed[pointer.active.manifest_digest] = reason[:300]
        self._write(Pointer(pointer.previous, None, failed))
        return pointer.previous

    def switch_to_previous(self) -> SlotInfo:
        """Serve the previous slot again (a rollback); the current one becomes previous."""
        pointer = self.read()
        if pointer.previous is None:
            raise LocalStateError("no previous model slot to go back to")
        self._write(Pointer(pointer.previous, pointer.active, pointer.failed))
        return pointer.previous

    def failure(self, manifest_digest: str) -> str | None:
        return (self.read().failed or {}).get(manifest_digest)

    def damage(
        self,
        info: SlotInfo,
        key: Verifier,
        runs: Callable[[Manifest], str | None],
        keys_incomplete: str | None = None,
    ) -> str | None:
        """Why the slot of `info`, verified when it was installed, no longer opens for a
        reason of this device, not of its bundle: its manifest or a listed file changed (bit
        rot, a foreign edit: deleted here, so the next install downloads it again) or went
        missing (`runs`: the variant file this device runs), or its signature does not verify
        while `keys_incomplete` (why the trusted keys may lack the one that signed it). None
        when its files are as installed: the failure is then the bundle's."""
        directory = self.slot_dir(info.slot)
        path = directory / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return f"{path} is missing"
        except OSError as exc:
            return f"cannot read {path} ({exc.strerror or exc})"
        if "sha256:" + hashlib.sha256(raw).hexdigest() != info.manifest_digest:
            return self._drop_damaged(directory, [MANIFEST])
        try:
            manifest = parse_manifest(raw, str(path))
            variant = runs(manifest)
        except AutoglmError:
            return None
        needed = {manifest.golden.file, *manifest.files, *([variant] if variant else [])}
        changed, missing = [], []
        for name, digest in sorted(bundle_paths(manifest).items()):
            try:
                if sha256_file(directory / name) != digest:
                    changed.append(name)
            except FileNotFoundError:
                if name in needed:
                    missing.append(name)
            except OSError as exc:
                return f"cannot read {directory / name} ({exc.strerror or exc})"
        if changed:
            return self._drop_damaged(directory, changed)
        if missing:
            return f"{directory}: {', '.join(missing)} missing"
        if keys_incomplete is None:
            return None
        try:
            read_signed_manifest(directory, key)
        except AutoglmError as exc:
            return f"{exc}, while {keys_incomplete}"
        return None

    def _drop_damaged(self, directory: Path, names: list[str]) -> str:
        """Deletes the files `names` of `directory`, whose bytes are no longer those
        installed; says what was done."""
        for name in names:
            try:
                remove_durably(directory / name)
            except OSError as exc:  # the install's download checks it again
                log.warning("%s: cannot delete this damaged file: %s", directory / name, exc)
        return (
            f"{directory}: {', '.join(names)} changed since it was installed (damaged on this "
            "device); deleted, downloaded again at the next install"
        )
