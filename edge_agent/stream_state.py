"""What a stopping agent has not scored yet, kept across a restart.

At a stop the pipeline holds readings acknowledged to the broker but not aligned into a closed
grid slot yet (the aligner's open slots), the last window's rows (the ring a window is cut
from), rows collected towards a calibration, and each decider's recent scores. Without them a
restart lost ~2 readings per sensor and ~one window length of unscored windows per asset.
`runtime.stop` writes them here after the pipeline and inference have drained; the pipeline
thread also writes its part (not the deciders') every `ingest.checkpoint_s`, so a kill -9
resumes from at most that long ago. The next start takes them back when the model version
and sensors are the same, and leaves the file until the first checkpoint replaces it (an agent
crash-looping faster than `checkpoint_s` resumes from it each time); without checkpoints it
deletes it, so a later kill -9 never resumes from a stale stop. A state of another model or
sensors is left in place (a swap builds the new model's data path before knowing it starts:
removing the old model's state then left a failed swap's restart on the old model nothing to
resume); the new data path's first checkpoint or stop replaces it, and `started` removes it
once that data path has started. A `running` marker, written at start and removed once a stop
kept everything, tells the next start that the previous one ended uncleanly (`unclean`). Each
replace and removal is made durable (the directory fsynced).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.files import fsync_dir, replace_atomically

log = logging.getLogger(__name__)

Snapshot = dict[str, np.ndarray]


class StreamStates:
    """`STATE_DIR/stream/<asset>.npz`, one per asset, written at a graceful stop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # By asset, the file of another model or sensors `take` left in place, as it was then
        # (`_identity`): `started` removes it unless a write has replaced it since.
        self._foreign: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()  # `write` (pipeline thread) against `started`

    def _path(self, asset: str) -> Path:
        return self.directory / f"{asset}.npz"

    def save(self, asset: str, version: str, sensors: tuple[str, ...], state: Snapshot) -> bool:
        """Keeps `state`; False after a failure (disk full), which is logged: the stop must go
        on."""
        try:
            self.write(asset, version, sensors, state)
        except OSError as exc:
            log.error("cannot keep the stream state of %s (%s); it restarts afresh", asset, exc)
            return False
        return True

    def write(self, asset: str, version: str, sensors: tuple[str, ...], state: Snapshot) -> None:
        """Keeps `state` (atomically); raises OSError."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {
            "model_version": np.array(version),
            "sensors": np.array(sensors),
            **state,
        }
        np.savez(buffer, **arrays)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_atomically(self._path(asset), buffer.getvalue(), 0o600)
            fsync_dir(self.directory)
            self._foreign.pop(asset, None)

    @property
    def _marker(self) -> Path:
        return self.directory / "running"

    def unclean(self) -> bool:
        """Whether the previous data path on this state directory started and never stopped
        cleanly (kill -9, power loss, a stop that could not keep its stream)."""
        return self._marker.exists()

    def running(self) -> None:
        """Marks the data path as running until `stopped`; a failure is logged."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            replace_atomically(self._marker, b"", 0o600)
            fsync_dir(self.directory)
        except OSError as exc:
            log.error("cannot mark the stream as running (%s): a kill -9 goes uncounted", exc)

    def stopped(self) -> None:
        self._remove(self._marker)

    def _remove(self, path: Path) -> None:
        """Removes `path` durably; a failure is logged (a stale file is resumed at worst)."""
        try:
            path.unlink(missing_ok=True)
            fsync_dir(self.directory)
        except OSError as exc:
            log.error("cannot remove %s (%s)", path, exc)

    def started(self) -> None:
        """The data path that took the states has started: the states of another model or
        sensors it left in place (`take`) go, unless a checkpoint or stop replaced them."""
        with self._lock:
            foreign, self._foreign = self._foreign, {}
            for asset, seen in foreign.items():
                path = self._path(asset)
                try:
                    same = _identity(path) == seen
                except OSError:  # already gone
                    continue
                if same:
                    self._remove(path)

    def take(
        self, asset: str, version: str, sensors: tuple[str, ...], keep: bool = False
    ) -> Snapshot | None:
        """The state kept for `asset` under this model and sensors; `keep`: left on disk for
        the next checkpoint to replace (else removed). An unreadable state is removed; one of
        another model or sensors is left for `started` to remove (the data path taking it may
        fail to start, and the one before start again on it)."""
        path = self._path(asset)
        try:
            with np.load(path, allow_pickle=False) as doc:
                state = {k: doc[k] for k in doc.files}
            made_for = str(state.pop("model_version")), tuple(str(s) for s in state.pop("sensors"))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - any damage (a bad zip, a cut file, no keys)
            log.warning("%s: unreadable stream state (%r); the stream starts afresh", path, exc)
            self._remove(path)
            return None
        if made_for != (version, tuple(sensors)):
            log.info("%s: stream state of another model or sensors; not resumed", path)
            with self._lock, contextlib.suppress(OSError):  # gone: nothing to remove later
                self._foreign[asset] = _identity(path)
            return None
        if not keep:
            self._remove(path)
        return state


def _identity(path: Path) -> tuple[int, int, int]:
    """The file at `path` as it is now: a replace (a new inode) or a rewrite changes it."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size
