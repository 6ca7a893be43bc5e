"""Wake-ups across replicas: PostgreSQL LISTEN/NOTIFY on one channel.

A writer calls `notify(session, topic)` inside the transaction that makes a change;
PostgreSQL delivers the notification at commit, and only then (once per topic and
transaction). Each replica's `ChangeListener` thread hears it and wakes that topic's
follower at once instead of at its next poll. It is only a wake-up: the followers still
poll their revision cursors at their interval, so a notification lost to a dropped
connection delays a change, never loses it. SQLite has no other process to wake.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import text
from sqlalchemy.orm import Session

from edge_agent.retry import Backoff

log = logging.getLogger(__name__)

CHANNEL = "autoglm_changes"
DESIRED = "desired"  # a device's desired model changed
DEVICES = "devices"  # a device was revoked, deleted, re-enrolled or renewed
ANY = "*"  # told to the follower when listening (re)starts: anything may have changed
OPERATORS = "operators"  # an operator was revoked
SESSION = "session"  # "session:<device id>:<generation>:<replica>": a session opened


def session_topic(device_id: str, generation: int, replica: str) -> str:
    """The topic telling replicas that the device's session `generation` opened on `replica`."""
    return f"{SESSION}:{device_id}:{generation}:{replica}"


def parse_session_topic(topic: str) -> tuple[str, int, str] | None:
    """(device id, generation, replica) of a session topic; None for other topics."""
    kind, device_id, generation, replica = (*topic.split(":", 3), "", "", "")[:4]
    if kind != SESSION or not device_id or not generation.isdigit():
        return None
    return device_id, int(generation), replica


def notify(s: Session, topic: str) -> None:
    """Tells every replica about `topic` when the transaction of `s` commits."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :topic)"), {"channel": CHANNEL, "topic": topic})


class ChangeListener:
    """A thread holding one PostgreSQL connection that LISTENs on the channel and calls
    `on_change(topic)` for each notification (from that thread), reconnecting with backoff."""

    def __init__(self, url: str, on_change: Callable[[str], None]) -> None:
        self.dsn = "postgresql://" + url.split("://", 1)[1]
        self.on_change = on_change
        self.listening = threading.Event()
        self.backoff = Backoff(0.5, 30.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    self.backoff.reset()
                    self.on_change(ANY)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.on_change(note.payload)
            except psycopg.Error as exc:
                delay = self.backoff.next_delay()
                log.warning("change notifications: %s; polling only, again in %.1fs", exc, delay)
            except Exception:  # a follower's bug must not end the wake-ups
                delay = self.backoff.next_delay()
                log.exception("change notifications failed; again in %.1fs", delay)
            else:
                return
            finally:
                self.listening.clear()
            self._stop.wait(delay)
