"""One session per device across replicas: each session opened takes the device's next
generation in the store, so a replica finds its session replaced by one opened on another;
and the replacements are counted there, so a device flapping between replicas is seen.

A device whose sessions replace one another more than FLAP_REPLACEMENTS times within
FLAP_WINDOW_S is flapping: most likely two agents share its certificate (a cloned image),
each reconnecting at once when the other's session ends it. One warning says so; from then
until FLAP_FORGET_S pass without a replacement, the session replaced is told to come back in
FLAP_RETRY_S (RateLimited's hint, as a busy plane's refusal is), so the two take turns
instead of reconnecting every second forever. Times are wall-clock seconds: the replicas
that count them are different processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FLAP_REPLACEMENTS = 3
FLAP_WINDOW_S = 60.0
FLAP_FORGET_S = 600.0
FLAP_RETRY_S = 60.0


@dataclass(frozen=True)
class SessionClaim:
    """The device's newest session, fleet-wide, and its recent replacements."""

    device_id: str
    generation: int  # taken by each session opened; an older open session was replaced
    replica: str = ""  # the replica that opened it
    peer: str = ""  # its client's address, as gRPC gives it
    replaced_at: tuple[float, ...] = ()  # replacements within FLAP_WINDOW_S, newest last
    flapping_at: float | None = None  # the latest replacement while the device flaps


@dataclass(frozen=True)
class Replacement:
    """What one replacement of a device's session means."""

    flapping: bool  # the session replaced is told to come back in FLAP_RETRY_S
    started: bool  # this replacement made the device flapping: warn, once
    recent: int  # replacements within FLAP_WINDOW_S, this one included


def opened(claim: SessionClaim | None, device_id: str, replica: str, peer: str) -> SessionClaim:
    """The claim of a session opened now: the next generation, on `replica`."""
    if claim is None:
        return SessionClaim(device_id, 1, replica, peer)
    return dataclasses.replace(claim, generation=claim.generation + 1, replica=replica, peer=peer)


def replaced(claim: SessionClaim, now: float) -> tuple[SessionClaim, Replacement]:
    """Counts a replacement of the device's session at `now`: the claim to keep, and what
    it means. Only the newest FLAP_REPLACEMENTS + 1 times are kept: more do not change it."""
    times = (*(t for t in claim.replaced_at if now - t <= FLAP_WINDOW_S), now)
    last = claim.flapping_at
    flapping = last is not None and now - last <= FLAP_FORGET_S
    started = not flapping and len(times) > FLAP_REPLACEMENTS
    flapping = flapping or started
    kept = dataclasses.replace(
        claim,
        replaced_at=times[-(FLAP_REPLACEMENTS + 1) :],
        flapping_at=now if flapping else None,
    )
    return kept, Replacement(flapping, started, len(times))
