"""Alerts raised on site and not cleared yet, kept on disk (one file per asset), so an agent
that restarts mid-fault clears the same alert afterwards instead of leaving it firing in the
cloud and `fault` in the site's retained state forever, or raising it a second time."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.files import UNREADABLE, make_dir_durably, remove_durably, replace_atomically

log = logging.getLogger(__name__)


class OpenAlerts:
    """`STATE_DIR/alerts/<asset>.json` while an alert is open on that asset."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, asset: str) -> Path:
        return self.directory / f"{asset}.json"

    def load(self, asset: str) -> AlertEvent | None:
        path = self._path(asset)
        try:
            doc = json.loads(path.read_text())
            event = AlertEvent(
                **{k: v for k, v in doc.items() if k != "top_sensors"},
                top_sensors=tuple((str(s), float(c)) for s, c in doc["top_sensors"]),
            )
        except FileNotFoundError:
            return None
        except UNREADABLE as exc:
            log.warning("%s: unreadable open alert (%s); starting without it", path, exc)
            return None
        if event.kind != RAISED or event.asset != asset:
            log.warning("%s: not an open alert of %s; ignored", path, asset)
            return None
        log.info("alert %s on %s is still open from before the restart", event.key, asset)
        return event

    def update(self, event: AlertEvent) -> None:
        """Keeps a raised alert, forgets a cleared one. A failure is logged: the alert path
        itself (site topic, outbox) must go on."""
        path = self._path(event.asset)
        try:
            if event.kind == RAISED:
                make_dir_durably(path.parent)
                replace_atomically(path, json.dumps(asdict(event)).encode(), 0o644)
            else:  # gone for good: a power cut must not bring the alert back
                remove_durably(path)
                remove_durably(self._held_path(event.asset))
        except OSError as exc:
            log.error("cannot keep the open alert of %s in %s: %s", event.asset, path, exc)

    # An open alert a maintenance period kept off the site: published when the period ends,
    # after a restart too.
    def _held_path(self, asset: str) -> Path:
        return self.directory / f"{asset}.held"

    def hold(self, asset: str) -> None:
        try:
            replace_atomically(self._held_path(asset), b"", 0o644)
        except OSError as exc:
            log.error("cannot mark the open alert of %s as held back: %s", asset, exc)

    def release(self, asset: str) -> None:
        try:
            remove_durably(self._held_path(asset))
        except OSError as exc:
            log.error("cannot unmark the open alert of %s: %s", asset, exc)

    def is_held(self, asset: str) -> bool:
        return self._held_path(asset).exists()
