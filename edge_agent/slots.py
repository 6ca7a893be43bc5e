"""A/B install slots for models, so a device always has a verified model to serve.

    STATE_DIR/models/slot-a/, slot-b/   bundle files (manifest.json, manifest.sig, ...)
    STATE_DIR/models/active.json        which slot serves, which served before, what failed

A new version goes into the idle slot (never the serving one); `activate` then replaces
`active.json` atomically (write, fsync, rename, fsync the directory), so a power cut leaves
either the old pointer or the new one, and both name a slot that was verified. Before the
idle slot is overwritten it stops being "previous", so the pointer never names a slot being
written.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_agent.errors import LocalStateError
from edge_agent.files import UNREADABLE, fsync_dir, replace_atomically

log = logging.getLogger(__name__)
POINTER = "active.json"
TARGET = ".target"  # in a slot: the manifest digest being installed there


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
        root.mkdir(parents=True, exist_ok=True)

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
        except UNREADABLE as exc:
            raise LocalStateError(
                f"{path}: unreadable ({exc}); move it away to start without a model"
            ) from None

    def _write(self, pointer: Pointer) -> None:
        replace_atomically(self.root / POINTER, pointer.to_json(), 0o644)
        fsync_dir(self.root)

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
        interrupted install of the same digest stay (downloads resume), anything else goes."""
        pointer = self.read()
        if pointer.active is not None and pointer.active.slot == slot:
            raise LocalStateError(f"slot {slot} is serving; install into the idle slot")
        if pointer.previous is not None and pointer.previous.slot == slot:
            self._write(Pointer(pointer.active, None, pointer.failed))
        directory = self.slot_dir(slot)
        marker = directory / TARGET
        if not (marker.is_file() and marker.read_text() == manifest_digest):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            replace_atomically(marker, manifest_digest.encode(), 0o644)
        return directory

    def activate(self, info: SlotInfo) -> None:
        """Makes `info.slot` the serving slot; the one serving before becomes previous."""
        pointer = self.read()
        previous = pointer.active if pointer.active and pointer.active.slot != info.slot else None
        failed = dict(pointer.failed or {})
        failed.pop(info.manifest_digest, None)
        self._write(Pointer(info, previous, failed))
        log.info("slot %s now serves %s:%s", info.slot, info.name, info.version)

    def fall_back(self, reason: str) -> SlotInfo | None:
        """The active slot failed at start: serve the previous one; remember the failure."""
        pointer = self.read()
        failed = dict(pointer.failed or {})
        if pointer.active is not None:
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
