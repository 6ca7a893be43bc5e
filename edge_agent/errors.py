"""One error hierarchy for the whole system: each class knows its gRPC status and CLI exit code.

This is a contract module: the control plane imports it too, so both sides map errors once
(the server interceptor to gRPC status codes, the CLIs to exit codes) and a client turns a
gRPC status back into the same class with `from_rpc_error`.
"""

from __future__ import annotations

import sys

import grpc


class AutoglmError(Exception):
    """Base of every error the system reports to a person or a peer."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1
    label: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(AutoglmError):
    """A request, argument or file is malformed."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2
    label = "invalid input"


class ConfigError(InvalidInput):
    """A configuration file or environment override is wrong."""

    label = "config error"


class NotFound(AutoglmError):
    """The named thing does not exist."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    exit_code = 3
    label = "not found"


class AlreadyExists(AutoglmError):
    """A thing with that name or key exists already."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    exit_code = 4
    label = "already exists"


class Unauthenticated(AutoglmError):
    """The caller has no valid credential (token, certificate)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 5
    label = "not authenticated"


class PermissionDenied(AutoglmError):
    """The caller is known but may not do this (revoked device, another device's resource)."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 6
    label = "permission denied"


class FailedPrecondition(AutoglmError):
    """The system is not in a state that allows this (already enrolled, not initialised)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 7
    label = "failed precondition"


class Unavailable(AutoglmError):
    """A peer cannot be reached (control plane down, TLS handshake refused)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 8
    label = "unavailable"


class LocalStateError(AutoglmError):
    """Local files cannot be read or written (state directory, keys)."""

    exit_code = 9
    label = "local state error"


class DiskFull(LocalStateError):
    """A write failed for lack of space (ENOSPC, EDQUOT) on the local disk."""


class ReadOnlyDisk(LocalStateError):
    """A write failed because the local file system is read-only (EROFS)."""


class IntegrityError(AutoglmError):
    """A signature, digest or certificate does not verify."""

    grpc_code = grpc.StatusCode.DATA_LOSS
    exit_code = 10
    label = "integrity error"


class NotImplementedYet(AutoglmError):
    """The contract has the call, this control plane does not serve it yet."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    exit_code = 11
    label = "not implemented"


class Conflict(AutoglmError):
    """Someone else changed the record between this writer's read and its write (a
    compare-and-set lost); read it again and decide again."""

    grpc_code = grpc.StatusCode.ABORTED
    exit_code = 12
    label = "conflict"


class RateLimited(AutoglmError):
    """Too many attempts from one caller, or a server too busy; wait and try again.

    `retry_after_s` (0: not said) travels as the trailing metadata `RETRY_AFTER_KEY`."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 13
    label = "rate limited"

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


RETRY_AFTER_KEY = "autoglm-retry-after-ms"


_BY_CODE: dict[grpc.StatusCode, type[AutoglmError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidInput,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        Unavailable,
        IntegrityError,
        NotImplementedYet,
        Conflict,
        RateLimited,
    )
}
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable


# gRPC core drops a call that waited longer than this for the server's Python side to take it
# (`grpc.server_max_unrequested_time_in_server`; grpc.aio takes calls one at a time, a turn of
# its event loop each), and refuses new calls at once while too many wait
# (`grpc.server.max_pending_requests`): either way the caller sees a bare CANCELLED. The
# control plane sets both (`cloud/service/server.py`).
# 55 s, not gRPC's 30: just under an agent's default setup timeout (60 s, connect and TLS
# included). In 10,000-agent restart storms it brought every agent back sooner with fewer
# failed attempts in both alternated pairs, by less than runs of one setting differ
# (tests/benchmarks/README.md, "E17a").
UNREQUESTED_LIMIT_S = 55
# What a caller that did not cancel its own call is told about a CANCELLED: its peer ended it
# without an answer. Opening a call, that is a server shutting down or too busy to take it;
# on a stream open for a while, the server or a proxy between ended it.
ENDED_UNANSWERED = (
    "the server ended the call without an answer (gRPC CANCELLED): it is shutting down, or, "
    "when this is a new call, too busy to take it (too many new calls waiting, or one "
    f"waiting over {UNREQUESTED_LIMIT_S} s: many clients connecting at once; try again)"
)
# grpc.aio's status for a client's write that failed because the call had ended meanwhile (the
# connection dropped, or the server answered: a plane killed mid-session, a refusal racing
# the hello); the call's real status is lost.
_ENDED_UNDER_WRITE = "internal error from core"
ENDED_UNDER_WRITE = (
    "the call ended while this side was sending on it (gRPC's 'Internal error from Core': the "
    "connection dropped or the server ended the call meanwhile; its answer is lost)"
)
# CANCELLED with these details is this process's own doing (sync gRPC; grpc.aio raises
# asyncio.CancelledError instead): not the peer's.
_LOCAL_CANCELS = (
    "locally cancelled by application",
    "channel closed",
    "cancelled upon garbage collection",
)


def from_rpc_error(error: grpc.RpcError, peer: str) -> AutoglmError:
    """Turns a failed call into the matching error, naming the peer it came from."""
    # Sync calls raise grpc.Call instances; grpc.aio raises AioRpcError: both have code/details.
    code_of, details_of = getattr(error, "code", None), getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = (details_of() if callable(details_of) else None) or str(error)
    cls = _BY_CODE.get(code, AutoglmError)
    if code == grpc.StatusCode.CANCELLED and not any(
        local in details.lower() for local in _LOCAL_CANCELS
    ):
        return Unavailable(f"{peer}: {ENDED_UNANSWERED}: {details}")
    if (
        code == grpc.StatusCode.INTERNAL
        and details.strip().lower() == _ENDED_UNDER_WRITE
        and not _received_from_peer(error)
    ):
        return Unavailable(f"{peer}: {ENDED_UNDER_WRITE}")
    if cls is Unavailable:
        details = f"cannot reach {peer}: {_explain_unavailable(details)}"
    if cls is RateLimited:
        return RateLimited(details, retry_after_s=_retry_after_s(error))
    return cls(details)


def _received_from_peer(error: grpc.RpcError) -> bool:
    """Whether an INTERNAL status came over the wire rather than being set by grpc.aio here,
    by gRPC's debug string: sync gRPC's says "received from peer", grpc.aio's is
    "INTERNAL:<details>" for a received status and the failed operation's for its own
    ('Failed "execute_batch": ...')."""
    debug = getattr(error, "debug_error_string", None)
    text = str(debug() if callable(debug) else "")
    return "received from peer" in text.lower() or text.startswith("INTERNAL:")


def _retry_after_s(error: grpc.RpcError) -> float:
    """The server's retry hint in the trailing metadata; 0 when absent or unreadable."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


def _explain_unavailable(details: str) -> str:
    """Says in words what gRPC's transport messages usually mean, the specific cause first."""
    lowered = details.lower()
    if "hostname verification" in lowered:
        return (
            "the server's certificate does not name the address you connect to (it names "
            "the hosts given to `autoglm cloud init --host`): connect by one of those names, "
            f"or pass --tls-server-name: {details}"
        )
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return (
            "the server's certificate is not signed by the CA you trust (use the control "
            "plane's ca.crt), or a clock is outside the certificates' validity: "
            f"{details}"
        )
    if "security handshaker" in lowered:
        return f"TLS could not start: is the CA file a PEM certificate?: {details}"
    if "stream removed" in lowered:  # an open stream lost its connection, not a handshake
        return f"the connection dropped during the call: {details}"
    if "socket closed" in lowered:
        return (
            "the server closed the connection during the TLS handshake: this is likely a port "
            "that needs a client certificate (the device port; operators use the API port): "
            f"{details}"
        )
    if "ssl_error" in lowered or "handshake" in lowered:
        return (
            "the TLS handshake failed (the server certificate is not signed by the CA you "
            "trust, the name does not match, or a clock is outside the certificates' "
            f"validity): {details}"
        )
    if "connection refused" in lowered or "failed to connect" in lowered:
        return f"nothing is listening there: {details}"
    return details


def report(program: str, error: AutoglmError) -> int:
    """Prints one readable line for a person and returns the command's exit code. A file
    name that is not UTF-8 is written with \\x escapes, whatever stderr's error handler."""
    line = f"{program}: {error.label}: {error}"
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    return error.exit_code
