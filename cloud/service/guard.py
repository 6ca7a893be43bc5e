"""The one server interceptor: operator authentication and error mapping for every call."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from cloud.clock import utc_now
from cloud.domain import AuditEntry
from cloud.service.bounds import check_message, check_request_message
from cloud.service.roles import audited, authorize, target_of
from cloud.store.base import OperatorStore
from cloud.store.notify import ANY, OPERATORS
from cloud.tokens import hash_token
from edge_agent.errors import (
    RETRY_AFTER_KEY,
    AutoglmError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

OPERATOR_SERVICE = "/autoglm.v1.OperatorService/"
TOKEN_CACHE_S = 5.0
# An open stream's caller is checked again every TOKEN_CACHE_S; a check the store cannot
# answer (Unavailable: a brief database error) keeps the last good answer this long before
# the stream ends. A revoked or unknown token (Unauthenticated, PermissionDenied) ends it now.
RECHECK_GRACE_S = 60.0
MAX_DETAILS = 1000  # characters of an error's details sent back
REFUSED_AUDITS_PER_MINUTE = 60  # refused calls of one operator recorded per minute
# Calls after which the caller cache is dropped, whatever their outcome (one that committed
# and then failed to answer still counts).
REVOKES = frozenset({"RevokeOperator"})


# The operator making the current call (set by the guard; read by handlers that record who
# did something, e.g. an alert acknowledgement).
current_operator: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_operator", default=""
)


class OperatorTokens:
    """Checks bearer tokens against the store, caching good ones for `cache_s` seconds.

    A revocation drops the whole cache (`forget`): at once on the replica that made it (the
    guard calls `forget` after RevokeOperator), and on the others when they are told of it
    (`heard`, given PostgreSQL's change notifications); a replica that is not told sees the
    revocation when the entry expires. Open streams check their caller again every `cache_s`
    and before each message (see `_rechecked`)."""

    def __init__(
        self,
        store: OperatorStore,
        cache_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache_s = TOKEN_CACHE_S if cache_s is None else cache_s
        self.clock = clock
        self._cache: dict[str, tuple[float, Caller]] = {}
        # Bumped by `forget`: a lookup under way across it (it may have read the operator
        # before the revocation committed) answers its call but is not cached.
        self._generation = 0

    def forget(self) -> None:
        """Drops every cached token: the next call of each looks its operator up again."""
        self._generation += 1
        self._cache.clear()

    def heard(self, topic: str) -> None:
        """A change notification (event loop): operators changed, or anything may have."""
        if topic in (OPERATORS, ANY):
            self.forget()

    async def check(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller:
        """The operator; Unauthenticated when the token is missing, unknown or revoked."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise Unauthenticated(
                "operator calls need a token: pass --token, set AUTOGLM_TOKEN "
                "or run `autoglm login`"
            )
        text = header.decode() if isinstance(header, bytes) else header
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization header must be 'Bearer <operator token>'")
        digest = hash_token(token.strip())
        expires, caller = self._cache.get(digest, (0.0, Caller("", "")))
        if expires > self.clock():
            return caller
        generation = self._generation
        operator = await asyncio.to_thread(self.store.operator_by_token_hash, digest)
        caller = Caller(operator.name, operator.role)
        if generation == self._generation:
            self._cache[digest] = (self.clock() + self.cache_s, caller)
        return caller


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


class CallGuard(aio.ServerInterceptor):
    """Authenticates operator calls and maps domain errors to gRPC status codes, once."""

    def __init__(self, tokens: OperatorTokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        needs_token = method.startswith(OPERATOR_SERVICE)
        metadata = handler_call_details.invocation_metadata
        return _wrap(handler, method, self.tokens if needs_token else None, metadata)


def behavior_and_factory(handler: Any) -> tuple[Any, Any]:
    """A method handler's behaviour and the grpc factory that makes a handler of its kind
    (for interceptors that wrap the behaviour and keep the kind)."""
    if handler.unary_unary:
        return handler.unary_unary, grpc.unary_unary_rpc_method_handler
    if handler.unary_stream:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    if handler.stream_unary:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    return handler.stream_stream, grpc.stream_stream_rpc_method_handler


def _wrap(handler: Any, method: str, tokens: OperatorTokens | None, metadata: Any) -> Any:
    """The same handler kind, its behaviour wrapped in authentication and error mapping."""
    streaming_response = handler.response_streaming
    behavior, factory = behavior_and_factory(handler)

    streaming_request = handler.request_streaming

    def checked(request: Any) -> Any:
        """The request, or the request stream, with every message checked against its bounds
        as it arrives (a record batch's records are checked one by one by the servicer, which
        answers with the ones it rejects)."""
        if not streaming_request:
            check_message(request)
            return request

        async def each() -> AsyncIterator[Any]:
            async for message in request:
                check_request_message(message)
                yield message

        return each()

    name = method.rsplit("/", 1)[-1]

    async def authorized() -> Caller | None:
        if tokens is None:
            return None
        caller = await tokens.check(metadata)
        current_operator.set(caller.name)
        return caller

    async def record(caller: Caller | None, request: Any, outcome: tuple[str, str]) -> None:
        if caller is not None and tokens is not None and audited(name):
            target = "" if streaming_request else target_of(request)
            await _audit(tokens.store, caller, name, target, outcome)

    async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        caller, outcome = None, ("OK", "")
        try:
            caller = await authorized()
            if caller is not None:
                authorize(caller.role, name)
            result = behavior(checked(request), context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as exc:  # noqa: BLE001 - mapped, never swallowed
            outcome = _outcome(exc)
            # Recorded before the caller hears of it: its next call is recorded after.
            await record(caller, request, outcome)
            caller = None
            await _abort(context, method, exc)
        finally:
            if tokens is not None and name in REVOKES:
                tokens.forget()
            await record(caller, request, outcome)

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        caller, outcome = None, ("OK", "")
        try:
            caller = await authorized()
            if caller is not None:
                authorize(caller.role, name)
            result = behavior(checked(request), context)
            if tokens is not None:
                # Its caller checked again before each message and every cache_s while idle:
                # a stream does not outlive a revocation by more than a few seconds.
                result = _rechecked(result, lambda: tokens.check(metadata), tokens.cache_s)
            async for item in result:
                yield item
        except BaseException as exc:  # noqa: BLE001 - mapped, never swallowed
            outcome = _outcome(exc)
            # Recorded before the caller hears of it: its next call is recorded after.
            await record(caller, request, outcome)
            caller = None
            await _abort(context, method, exc)
        finally:
            await record(caller, request, outcome)

    return factory(
        streaming if streaming_response else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


_END = object()


async def _rechecked(
    items: AsyncIterator[Any],
    check: Callable[[], Awaitable[object]],
    every_s: float,
    grace_s: float = RECHECK_GRACE_S,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Any]:
    """`items`, with the caller checked again (`check` raises when it may no longer call)
    before each one and every `every_s` while none comes: an idle watch ends too. A check
    that fails with Unavailable (the store, not the caller) keeps the last good answer for up
    to `grace_s` after it; any other failure ends the stream at once."""
    iterator = aiter(items)
    good_at = clock()

    async def recheck() -> None:
        nonlocal good_at
        try:
            await check()
        except Unavailable as exc:
            if clock() - good_at > grace_s:
                raise
            log.warning("an operator stream's caller could not be checked again: %s", exc)
            return
        good_at = clock()

    async def following() -> Any:
        try:
            return await anext(iterator)
        except StopAsyncIteration:
            return _END

    try:
        while True:
            pending = asyncio.ensure_future(following())
            try:
                while not (await asyncio.wait((pending,), timeout=every_s))[0]:
                    await recheck()
            except BaseException:
                pending.cancel()
                await asyncio.wait((pending,))  # the handler unwinds before the call ends
                raise
            item = pending.result()
            if item is _END:
                return
            await recheck()
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _outcome(exc: BaseException) -> tuple[str, str]:
    """(status code name, detail) an audited call ended with."""
    if isinstance(exc, AutoglmError):
        return exc.grpc_code.name, _bounded(str(exc))
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED", ""
    if isinstance(exc, aio.AbortError):
        return "ABORTED", ""
    return "INTERNAL", type(exc).__name__


class RefusedBudget:
    """Refused calls written to the audit log per operator and minute: a token looping on
    calls its role does not allow cannot fill the table (what is left out is logged)."""

    def __init__(self, per_minute: int = REFUSED_AUDITS_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, tuple[float, int]] = {}

    def allows(self, operator: str) -> bool:
        now = time.monotonic()
        start, count = self._windows.get(operator, (now, 0))
        if now - start >= 60.0:
            if count > self.per_minute:
                log.warning(
                    "audit log: %d refused calls by %s in a minute, %d not recorded",
                    count, operator, count - self.per_minute,
                )  # fmt: skip
            start, count = now, 0
        if len(self._windows) > 10_000:  # operators are few; stay bounded anyway
            self._windows.clear()
        self._windows[operator] = (start, count + 1)
        return count < self.per_minute


_refused = RefusedBudget()


async def _audit(
    store: OperatorStore, caller: Caller, method: str, target: str, outcome: tuple[str, str]
) -> None:
    """Writes the call to the audit log; a store that cannot take it is logged, and the
    call's own result stands."""
    if outcome[0] != "OK" and not _refused.allows(caller.name):
        return
    entry = AuditEntry(
        at=utc_now(), operator=caller.name, role=caller.role, method=method,
        target=target, code=outcome[0], detail=outcome[1],
    )  # fmt: skip
    try:
        await asyncio.to_thread(store.add_audit, entry)
    except Exception as exc:  # noqa: BLE001 - never fails the call it records
        log.error("audit log: cannot record %s by %s (%s)", method, caller.name, exc)


async def _abort(context: aio.ServicerContext[Any, Any], method: str, exc: BaseException) -> None:
    # Not errors of the call: an abort already under way, a cancelled task, a closed stream
    # (GeneratorExit when the client went away), or the process stopping.
    if isinstance(
        exc,
        aio.AbortError | asyncio.CancelledError | GeneratorExit | KeyboardInterrupt | SystemExit,
    ):
        raise exc
    if isinstance(exc, AutoglmError):
        await context.abort(*status_of(exc))
    if isinstance(exc, NotImplementedError):
        name = method.rsplit("/", 1)[-1]
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"this control plane does not serve {name} yet"
        )
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident}, see the control-plane log)"
    )


def status_of(error: AutoglmError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status a domain error ends a call with: code, details, trailing metadata (a
    retry hint where it has one)."""
    hint: tuple[tuple[str, str], ...] = ()
    if isinstance(error, RateLimited) and error.retry_after_s > 0:
        hint = ((RETRY_AFTER_KEY, str(round(error.retry_after_s * 1000))),)
    return error.grpc_code, _bounded(str(error)), hint


def _bounded(details: str) -> str:
    """Error details stay small whatever input they quote (a client's metadata limit would
    otherwise turn the real status into RESOURCE_EXHAUSTED)."""
    if len(details) <= MAX_DETAILS:
        return details
    return details[: MAX_DETAILS - 20] + f"... ({len(details)} chars)"
