"""What every console view shares: the signed-in session and its API calls, the HTTP status
of each project error, bounded form fields, HTML responses."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from cloud.console.api import OperatorCalls
from cloud.console.markup import Markup, page, tag
from cloud.console.sessions import ConsoleSession
from edge_agent.errors import (
    AlreadyExists,
    AutoglmError,
    Conflict,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

SESSION: web.RequestKey[ConsoleSession] = web.RequestKey("console_session", ConsoleSession)
CALLS: web.RequestKey[OperatorCalls] = web.RequestKey("console_calls", OperatorCalls)
MAX_FIELD = 500
MAX_FORM_BYTES = 64 * 1024
FORM_READ_S = 30.0  # a body sent slower than this (64 KiB at most) is refused, not waited on
HEADERS = {
    # Nothing inline runs: scripts and styles come from /static only, so markup that slipped
    # through escaping still could not execute.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on form
    # posts, and the origin check could not tell the console's own forms from others.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATUS: tuple[tuple[type[AutoglmError], int], ...] = (
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (AlreadyExists, 409),
    (Conflict, 409),
    (FailedPrecondition, 409),
    (RateLimited, 429),
    (Unavailable, 503),
    (InvalidInput, 400),
)
# What a finished action says on the page it returns to (?done=KEY): fixed words, so the
# query string cannot put text on the page.
DONE = {
    "ack": "Acknowledged.",
    "resolve": "Resolved.",
    "shelve": "Shelved.",
    "unshelve": "Unshelved: delivered again while open.",
    "pause": "Rollout paused.",
    "resume": "Rollout resumed.",
    "abort": "Rollout aborted: updated devices return to their previous version.",
}


def session_of(request: web.Request) -> ConsoleSession:
    return request[SESSION]


def calls_of(request: web.Request) -> OperatorCalls:
    return request[CALLS]


def http_status(error: AutoglmError) -> int:
    """The HTTP status for a project error (500 for one with no better match)."""
    return next((status for kind, status in _STATUS if isinstance(error, kind)), 500)


def error_text(error: AutoglmError) -> str:
    """The error as a person reads it: its kind, then what the API said."""
    kind = {401: "Not signed in", 403: "Permission denied", 404: "Not found"}.get(
        http_status(error), "Refused"
    )
    if http_status(error) >= 500:
        kind = "Failed"
    return f"{kind}: {error}"


def html(body: Markup, status: int = 200) -> web.Response:
    return web.Response(text=str(body), status=status, content_type="text/html", charset="utf-8")


def moved(at: dt.datetime, by: dt.timedelta) -> dt.datetime:
    """`at + by`, held inside the calendar (a device may stamp year 1 or 9999): past either
    end, the calendar's first or last instant (in `at`'s zone, UTC for the console)."""
    try:
        return at + by
    except OverflowError:
        end = dt.datetime.min if by < dt.timedelta(0) else dt.datetime.max
        return end.replace(tzinfo=at.tzinfo)


def field(form: dict[str, str], name: str, limit: int = MAX_FIELD) -> str:
    """A form field, stripped; InvalidInput when longer than `limit` characters."""
    value = form.get(name, "").strip()
    if len(value) > limit:
        raise InvalidInput(f"{name}: at most {limit} characters")
    return value


async def form_of(request: web.Request) -> dict[str, str]:
    """The posted form's text fields (files are ignored)."""
    try:
        async with asyncio.timeout(FORM_READ_S):
            data = await request.post()
    except TimeoutError:
        raise InvalidInput(f"the form did not arrive within {FORM_READ_S:g} s") from None
    except UnicodeError:
        raise InvalidInput(
            "the form is not valid text in its charset (UTF-8 unless named)"
        ) from None
    except LookupError as exc:  # charset=bogus, in the request's or a part's Content-Type
        raise InvalidInput(f"the form's charset is not one this console reads ({exc})") from None
    except (ValueError, RuntimeError, BadHttpMessage) as exc:
        # aiohttp's multipart reader: no or a wrong boundary, a part's unknown Content-Encoding
        # or Content-Transfer-Encoding (RuntimeError), too many headers in a part.
        raise InvalidInput(f"the form cannot be read: {exc}") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


def query(request: web.Request, name: str, limit: int = MAX_FIELD) -> str:
    value = request.query.get(name, "").strip()
    if len(value) > limit:
        raise InvalidInput(f"{name}: at most {limit} characters")
    return value


async def refused(
    render: Callable[[str, int], Awaitable[web.Response]], error: AutoglmError
) -> web.Response:
    """An action the API refused: the page it came from with the API's words on top, or,
    when that page cannot be shown either (its subject does not exist), an error page."""
    try:
        return await render(error_text(error), http_status(error))
    except Unauthenticated:
        raise
    except AutoglmError:
        body = tag("p", tag("a", "Back to the fleet", href="/fleet"))
        return html(page("Refused", body, error=error_text(error)), http_status(error))


def notice_of(request: web.Request) -> str:
    return DONE.get(request.query.get("done", ""), "")
