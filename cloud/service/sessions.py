"""Open agent sessions in this process, so a revocation can close them at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud.session_claims import (
    FLAP_RETRY_S,
    FLAP_WINDOW_S,
    Replacement,
    SessionClaim,
)
from edge_agent.errors import AutoglmError, Conflict, RateLimited

log = logging.getLogger(__name__)
# Jobs over every open session give the event loop a turn after this many devices.
FLEET_SLICE = 1000
# Control messages waiting to be written down one session. An agent's gRPC transport takes
# what arrives into its own buffers whether or not the agent has read it yet (400,000
# heartbeats sent in a tight loop by a client that never read left at most 22 waiting here),
# so only a client that withholds HTTP/2 window updates fills this: it would otherwise grow
# by one answer per message it sends. Full, the session ends (RESOURCE_EXHAUSTED). The end of
# the stream (`finish`) and the error that ends it go past the bound: one each at most.
OUTBOUND_LIMIT = 1024
# What `finish` queues: the client half-closed and everything before it has been answered.
END_OF_STREAM = object()


@dataclass(eq=False)
class LiveSession:
    """One open session stream: messages to send down, or the error that ends it."""

    device_id: str
    fingerprint: str = ""  # of the certificate the session was opened with
    peer: str = ""  # the client's address, as gRPC gives it
    outbound: asyncio.Queue[object] = field(default_factory=asyncio.Queue)  # see OUTBOUND_LIMIT
    ending: AutoglmError | None = None  # why the session ends, once it does
    finished: bool = False  # its clean end is queued (`finish`)
    desired_revision: int = 0  # of the newest desired state sent down this session
    maintenance: bytes | None = None  # the maintenance periods last sent down it
    opened_at: float = field(default_factory=time.monotonic)
    generation: int = 0  # its claim among the device's sessions fleet-wide (0: none)
    replica: str = ""  # the replica its claim names (this one, as the store keeps its name)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # forgotten by the plane
    reader: asyncio.Task[None] | None = None  # reads what the device sends, while open
    on_end: Callable[[], None] | None = None  # called once `ending` is set

    def send(self, message: object) -> None:
        """Queues a control message; past OUTBOUND_LIMIT waiting, the session ends instead."""
        if self.ending is not None or self.finished:
            return  # nothing after the end of the session is written
        if self.outbound.qsize() < OUTBOUND_LIMIT:
            self.outbound.put_nowait(message)
            return
        error = RateLimited(
            "the control plane ended this session; it is not busy: "
            f"{OUTBOUND_LIMIT} control messages wait to be sent down the session of device "
            f"{self.device_id}: it does not read its stream (reconnect and read the stream)"
        )
        log.warning("%s", error)
        self.end(error)

    def finish(self) -> None:
        """Queues the stream's clean end after what waits, whatever the bound: the client
        half-closed, and the answers queued before (its last batch acks) are its to read.
        Nothing after it is queued, an error that would end the session included."""
        if self.ending is None and not self.finished:
            self.finished = True
            self.outbound.put_nowait(END_OF_STREAM)

    def end(self, error: AutoglmError) -> None:
        """Ends the session with `error` after what is queued; when the queue is full, what
        is queued is dropped. The first reason given stands; after `finish`, none is needed."""
        if self.ending is not None or self.finished:
            return
        self.ending = error
        if self.outbound.qsize() >= OUTBOUND_LIMIT:
            while not self.outbound.empty():
                self.outbound.get_nowait()
        self.outbound.put_nowait(error)
        if self.on_end is not None:
            self.on_end()


class SessionHub:
    """Registry of live sessions by device id; only touched from the server's event loop.

    A device holds one session fleet-wide (`cloud.session_claims`): a new one ends the older
    here at once, and the replica holding an older one elsewhere ends it (`end_replaced`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._by_device: dict[str, set[LiveSession]] = {}
        self.clock = clock  # wall-clock seconds, for counting replacements across replicas

    def open(
        self,
        device_id: str,
        fingerprint: str = "",
        peer: str = "",
        generation: int = 0,
        replacement: Replacement | None = None,
        replica: str = "",
    ) -> LiveSession:
        """Registers a new session of the device; its older sessions here end (ABORTED, or
        RESOURCE_EXHAUSTED with a retry hint when `replacement`, the store's count of this
        replacement, says the device flaps): a device holds one session, and one that
        reconnects in a loop holds no more. When a session of a newer `generation` is here
        already (two setups whose claims returned out of order), the new one ends instead,
        unregistered."""
        live = LiveSession(device_id, fingerprint, peer, generation=generation, replica=replica)
        older = self._by_device.get(device_id, ())
        if replacement is not None and replacement.started:
            # The store counted it: warned once fleet-wide, even when the session it replaced
            # ended here (or was ended by another check) while the claim was taken.
            _warn_flapping(device_id, replacement, peer, [o.peer for o in older])
        newer = [o for o in older if generation and o.generation > generation]
        if newer:
            live.end(replaced_error(device_id, newer[0].peer, newer[0].replica, None))
            log.info("device %s: a session older than the one here ended as it opened", device_id)
            return live
        if older:
            error = replaced_error(device_id, peer, "", replacement)
            for old in older:
                old.end(error)
            log.info("device %s opened a new session; %d older ended", device_id, len(older))
        self._by_device[device_id] = {live}
        return live

    def replaced_by(self, newest: dict[str, tuple[int, str]], since: float) -> list[LiveSession]:
        """Sessions here, not ending yet, opened before `since` (when `newest` was read)
        under a claim other than their device's newest (`newest`: device id -> (generation,
        replica), as the store has them). Identity, not order: a store restored from an
        older backup hands out lower generations again."""
        return [
            live
            for device_id, claim in newest.items()
            for live in self._by_device.get(device_id, ())
            if live.generation
            and (live.generation, live.replica) != claim
            and live.opened_at < since
            and live.ending is None
        ]

    def end_replaced(
        self, sessions: list[LiveSession], claim: SessionClaim, replacement: Replacement
    ) -> None:
        """Ends sessions of one device that a newer one, on another replica, replaced."""
        if not sessions:
            return
        device_id = sessions[0].device_id
        if replacement.started:
            _warn_flapping(device_id, replacement, claim.peer, [o.peer for o in sessions])
        error = replaced_error(device_id, claim.peer, claim.replica, replacement)
        for live in sessions:
            live.end(error)
        log.info(
            "device %s opened a new session on replica %s; %d older here ended",
            device_id, claim.replica or "?", len(sessions),
        )  # fmt: skip

    def remove(self, live: LiveSession) -> None:
        sessions = self._by_device.get(live.device_id)
        if sessions is not None:
            sessions.discard(live)
            if not sessions:
                del self._by_device[live.device_id]

    def end_device(self, device_id: str, error: AutoglmError) -> int:
        """Ends every session of a device; returns how many were open."""
        sessions = list(self._by_device.get(device_id, ()))
        for live in sessions:
            live.end(error)
        if sessions:
            log.info("ended %d session(s) of device %s: %s", len(sessions), device_id, error)
        return len(sessions)

    def send_device(self, device_id: str, message: object) -> int:
        """Sends `message` down every open session of a device; returns how many."""
        sessions = list(self._by_device.get(device_id, ()))
        for live in sessions:
            live.send(message)
        return len(sessions)

    def send_desired(self, device_id: str, revision: int, message: object) -> int:
        """Sends a desired state down the device's sessions that have not had it (or a newer
        one) yet: the local push and the change feed may both deliver the same revision."""
        sent = 0
        for live in list(self._by_device.get(device_id, ())):
            if revision and live.desired_revision >= revision:
                continue
            live.desired_revision = max(live.desired_revision, revision)
            live.send(message)
            sent += 1
        return sent

    def send_maintenance(self, device_id: str, message: Any, encoded: bytes | None = None) -> int:
        """Sends the device's maintenance periods down its sessions that hold other ones
        (`encoded`: the message serialized deterministically, where the caller has it)."""
        if encoded is None:
            encoded = message.SerializeToString(deterministic=True)
        sent = 0
        for live in list(self._by_device.get(device_id, ())):
            if live.maintenance != encoded:
                live.maintenance = encoded
                live.send(message)
                sent += 1
        return sent

    def sessions(self, device_id: str) -> list[LiveSession]:
        """The device's open session here, if any (a newer one replaces it)."""
        return list(self._by_device.get(device_id, ()))

    def device_ids(self) -> list[str]:
        return list(self._by_device)

    def end_stale(
        self,
        checked: list[str],
        current: dict[str, tuple[bool, frozenset[str]]],
        error: AutoglmError,
        since: float,
    ) -> int:
        """Ends the sessions of the `checked` devices that may no longer act (`current`:
        device id -> (still active, current certificate fingerprint); a checked id absent
        from it was deleted) or whose certificate is not the current one (re-enrolled).
        Sessions opened at or after `since` (when the check began) are not judged: the
        store was read before them. Returns how many ended (the caller logs them, once for
        all its slices)."""
        ended = 0
        for device_id in checked:
            active, accepted = current.get(device_id, (False, frozenset()))
            for live in list(self._by_device.get(device_id, ())):
                if live.opened_at >= since:
                    continue
                if not active or (live.fingerprint and live.fingerprint not in accepted):
                    live.end(error)
                    ended += 1
        return ended

    def is_open(self, device_id: str) -> bool:
        return device_id in self._by_device


def replaced_error(
    device_id: str, peer: str, replica: str, replacement: Replacement | None
) -> AutoglmError:
    """Why a replaced session ends: ABORTED, or RESOURCE_EXHAUSTED with a retry hint of
    FLAP_RETRY_S while the device flaps."""
    where = f"from {peer or '?'}" + (f", on replica {replica}" if replica else "")
    ends = f"a newer session of device {device_id} opened ({where}); this one ends"
    if replacement is None or not replacement.flapping:
        return Conflict(ends)
    return RateLimited(
        f"{ends}: the device's sessions keep replacing one another (two agents with one "
        f"certificate?); the control plane is not busy; come back in {FLAP_RETRY_S:.0f} s",
        retry_after_s=FLAP_RETRY_S,
    )


def _warn_flapping(device_id: str, replacement: Replacement, peer: str, older: list[str]) -> None:
    log.warning(
        "device %s: its sessions replaced one another %d times within %.0f s, the newest from "
        "%s ending one from %s: two agents may share its certificate (a cloned image; enroll "
        "each device on its own); the session replaced is told to come back in %.0f s",
        device_id, replacement.recent, FLAP_WINDOW_S, peer or "?", ", ".join(older) or "?",
        FLAP_RETRY_S,
    )  # fmt: skip
