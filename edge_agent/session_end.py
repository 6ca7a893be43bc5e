"""Why a session ended or was refused, read from the control plane's status: a busy plane,
this agent not reading its stream and a newer session of this device all come as
RESOURCE_EXHAUSTED (the last also as ABORTED), and each calls for a different reaction.

The plane gives no reason code, only its message: the phrases below are its own
(`cloud/service/sessions.py`, `cloud/service/admission.py`), and tests/test_session_ends.py
checks them against the errors the plane raises, so a reworded message fails there rather
than turning every end back into "busy".
"""

from __future__ import annotations

import enum

from edge_agent.errors import AutoglmError, Conflict, PermissionDenied, RateLimited, Unauthenticated

# The plane ended the session because its queue of messages for this device filled: this
# agent did not read its stream.
NOT_READING_PHRASE = "does not read its stream"
# A newer session of this device opened: ABORTED, or RESOURCE_EXHAUSTED with a retry hint
# while the device's sessions keep replacing one another (two agents with one certificate).
REPLACED_PHRASE = "a newer session of device"
# Every RESOURCE_EXHAUSTED the plane sends that is not about its load says so.
NOT_BUSY_PHRASE = "not busy"


class SessionEnd(enum.Enum):
    """What the control plane's status means for this agent."""

    BUSY = "busy"  # the plane is overloaded: come back when its hint says
    NOT_READING = "not reading"  # this agent fell behind reading its stream
    REPLACED = "replaced"  # a newer session of this device opened
    REFUSED = "refused"  # this device may not connect (revoked, certificate not current)
    OTHER = "other"  # anything else: a dropped link, a store outage, a bad batch


def classify(error: AutoglmError) -> SessionEnd:
    """The kind of `error`, an error the session ended with (as `from_rpc_error` made it)."""
    if isinstance(error, PermissionDenied | Unauthenticated):
        return SessionEnd.REFUSED
    text = str(error)
    if isinstance(error, RateLimited | Conflict) and REPLACED_PHRASE in text:
        return SessionEnd.REPLACED
    if isinstance(error, RateLimited):
        if NOT_READING_PHRASE in text:
            return SessionEnd.NOT_READING
        if NOT_BUSY_PHRASE in text:
            return SessionEnd.OTHER
        return SessionEnd.BUSY
    return SessionEnd.OTHER
