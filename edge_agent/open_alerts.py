"""Alerts raised on site and not cleared yet, as older agents kept them on disk (one file per
asset; the outbox keeps them now and takes these over), and the marks of raises a
maintenance period held back, kept for a restart."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from edge_agent.decisions import RAISED, AlertEvent
from edge_agent.files import UNREADABLE, make_dir_durably, remove_durably, replace_atomically

log = logging.getLogger(__name__)


def encode_alert(event: AlertEvent) -> str:
    """An open alert as the outbox keeps it (the JSON `alerts/<asset>.json` held)."""
    return json.dumps(asdict(event))


def decode_alert(text: str, asset: str, where: str = "the outbox") -> AlertEvent | None:
    """The open alert of `asset` kept as `text` (in the outbox's table or an older agent's
    file, named by `where` in the log); None (logged) when it is not one."""
    try:
        doc = json.loads(text)
        event = AlertEvent(
            **{k: v for k, v in doc.items() if k != "top_sensors"},
            top_sensors=tuple((str(s), float(c)) for s, c in doc["top_sensors"]),
        )
    except UNREADABLE as exc:
        log.warning("%s: the open alert of %s is unreadable (%s); ignored", where, asset, exc)
        return None
    if event.kind != RAISED or event.asset != asset:
        log.warning("%s: not an open alert of %s; ignored", where, asset)
        return None
    return event


class OpenAlerts:
    """`STATE_DIR/alerts/`: `<asset>.json`, an alert an older agent kept open on that asset;
    `<asset>.held`, while a maintenance period holds its raise off the site."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, asset: str) -> Path:
        return self.directory / f"{asset}.json"

    def load(self, asset: str) -> AlertEvent | None:
        path = self._path(asset)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except UNREADABLE as exc:
            log.warning("%s: unreadable open alert (%s); starting without it", path, exc)
            return None
        event = decode_alert(text, asset, where=str(path))
        if event is not None:
            log.info("alert %s on %s is still open from before the restart", event.key, asset)
        return event

    # An open alert a maintenance period kept off the site: published when the period ends,
    # after a restart too.
    def _held_path(self, asset: str) -> Path:
        return self.directory / f"{asset}.held"

    def hold(self, asset: str) -> None:
        """Marks the open alert of `asset` as held back, making the folder (durably) when it
        is not there yet: the open alerts themselves are kept by the outbox now."""
        try:
            make_dir_durably(self.directory)
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
