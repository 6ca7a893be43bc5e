"""The console's HTTP server: routes, sign-in, and the checks every request passes (session,
CSRF and origin on changes, security headers, errors as pages without tracebacks)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

from aiohttp import web
from yarl import URL

from cloud.console import alerts, fleet, rollouts
from cloud.console.api import OperatorApi
from cloud.console.context import (
    CALLS,
    HEADERS,
    MAX_FORM_BYTES,
    SESSION,
    error_text,
    form_of,
    html,
    http_status,
)
from cloud.console.markup import join, page, tag
from cloud.console.peers import Network, client_address, trusted_networks
from cloud.console.sessions import COOKIE, SESSION_TTL_S, SessionSeal, clean_token
from cloud.service.enrollment import AttemptLimiter
from edge_agent.errors import AutoglmError, LocalStateError, Unauthenticated

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PUBLIC = ("/login", "/healthz")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SEAL: web.AppKey[SessionSeal] = web.AppKey("seal", SessionSeal)
API: web.AppKey[OperatorApi] = web.AppKey("api", OperatorApi)
ATTEMPTS: web.AppKey[AttemptLimiter] = web.AppKey("attempts", AttemptLimiter)
PROXIES: web.AppKey[tuple[Network, ...]] = web.AppKey("trusted_proxies", tuple)
LOGIN_FAILURES, LOGIN_WINDOW_S = 10, 300.0  # wrong tokens per client address, then a pause
# A connection is closed when no complete request (line and headers) has arrived this long
# after it opened or after its last answer: one that sends half a request, or nothing, is
# not held forever. Pages are answered, and event streams kept, for however long they take.
REQUEST_TIMEOUT_S = 15.0


def _live(request: web.Request) -> bool:
    """A script's request (fragments, the event stream): answered with status codes, not
    redirects or pages."""
    return request.path.startswith("/live/")


_PATH_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-.?=&%~:+,"
)


def _safe_next(target: str) -> str:
    """Where to go after signing in: a path of this console only. Any character outside a
    plain path's is refused: browsers and yarl drop tabs and newlines, so "/\t/evil" would
    become "//evil", another site."""
    if (
        not target.startswith("/")
        or target.startswith("//")
        or not set(target) <= _PATH_CHARS
        or URL(target).host
    ):
        return "/fleet"
    return target


def _to_login(request: web.Request, expired: bool = False) -> web.StreamResponse:
    if _live(request):
        return web.json_response({"error": "sign in first"}, status=401)
    target = request.path_qs if request.method in ("GET", "HEAD") else "/fleet"
    location = f"/login?next={quote(target)}" + ("&expired=1" if expired else "")
    response = web.Response(status=303, headers={"Location": location})
    if expired:
        response.del_cookie(COOKIE, path="/")
    return response


def _same_origin(request: web.Request) -> bool:
    """A change comes from this console's own pages: a browser's Origin (or, without one,
    Referer) names this host. Requests with neither (scripts, curl) pass on to the CSRF check."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source:
        return True
    if source == "null":
        return False
    return urlsplit(source).netloc == request.host


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, streamed ones and errors included, just before it is sent."""
    response.headers.update(HEADERS)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Project errors become a page (or JSON for scripts) with the API's words; anything else
    is logged and answered 500 without details."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Unauthenticated:
        return _to_login(request, expired=True)
    except AutoglmError as exc:
        status = http_status(exc)
        if _live(request):
            return web.json_response({"error": error_text(exc)}, status=status)
        session = request.get(SESSION)
        csrf = session.csrf if session is not None else ""
        return html(
            page(
                "Error",
                tag("p", tag("a", "Back to the fleet", href="/fleet")),
                csrf,
                error=error_text(exc),
            ),
            status,
        )
    except Exception:
        log.exception("console: %s %s failed", request.method, request.path)
        if _live(request):
            return web.json_response({"error": "internal error"}, status=500)
        body = tag("p", "Internal error; the control plane's log has the details.")
        return html(page("Error", body, error="Something went wrong."), 500)


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every page, fragment and action needs a session; changes also need this console's
    origin and the session's CSRF token."""
    if request.path in PUBLIC or request.path.startswith("/static/"):
        if request.method == "POST" and not _same_origin(request):
            raise web.HTTPForbidden(text="cross-site request refused")
        return await handler(request)
    session = request.app[SEAL].open(request.cookies.get(COOKIE))
    if session is None:
        return _to_login(request, expired=COOKIE in request.cookies)
    request[SESSION] = session
    request[CALLS] = request.app[API].as_operator(session.token)
    if request.method not in ("GET", "HEAD"):
        if not _same_origin(request):
            raise web.HTTPForbidden(text="cross-site request refused")
        submitted = request.headers.get("X-CSRF-Token", "")
        if not submitted and request.content_type in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            submitted = (await form_of(request)).get("_csrf", "")
        if not session.csrf_ok(submitted):
            csrf_page = page(
                "Refused",
                tag(
                    "p", "This form is stale or came from elsewhere; reload the page and try again."
                ),
                session.csrf,
                error="Refused: the form's CSRF token does not match this session.",
            )
            return html(csrf_page, 403)
    return await handler(request)


def _login_page(error: str = "", target: str = "/fleet", status: int = 200) -> web.Response:
    form = tag(
        "form",
        tag("label", "Operator token", for_="token"),
        tag(
            "input",
            type="password",
            id="token",
            name="token",
            required=True,
            autocomplete="off",
            size=60,
            maxlength=200,
        ),
        tag("input", type="hidden", name="next", value=target),
        tag("button", "Sign in", type="submit"),
        method="post",
        action="/login",
        class_="login",
    )
    hint = tag(
        "p",
        "Paste an operator token (",
        tag("code", "autoglm operator add NAME --role viewer|operator|admin"),
        " makes one). What you may see and do is what the token's role allows.",
        class_="summary",
    )
    return html(page("Sign in", join([form, hint]), error=error), status)


async def login_form(request: web.Request) -> web.Response:
    target = _safe_next(request.query.get("next", "/fleet"))
    expired = "Your session ended; sign in again." if request.query.get("expired") else ""
    return _login_page(expired, target)


async def login(request: web.Request) -> web.StreamResponse:
    form = await form_of(request)
    target = _safe_next(form.get("next", "/fleet"))
    token = clean_token(form.get("token", ""))
    if not token:
        return _login_page("Paste an operator token (agt_op_...).", target, 400)
    peer = client_address(request, request.app[PROXIES])
    attempts = request.app[ATTEMPTS]
    try:
        attempts.check(peer)  # failed sign-ins per client address are bounded
    except AutoglmError as exc:
        return _login_page(error_text(exc), target, http_status(exc))
    # Counted before the answer, so concurrent guesses cannot all pass the check; taken back
    # unless the token was refused.
    attempts.failed(peer)
    try:
        await request.app[API].as_operator(token).check()
    except Unauthenticated:
        return _login_page("That is not a live operator token.", target, 401)
    except AutoglmError as exc:
        attempts.took_back(peer)
        return _login_page(error_text(exc), target, http_status(exc))
    attempts.took_back(peer)
    _, cookie = request.app[SEAL].new(token)
    response = web.HTTPSeeOther(target)
    secure = request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/fleet")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps({"status": "serving"}), content_type="application/json")


def make_app(
    api: OperatorApi, seal: SessionSeal, trusted_proxies: Iterable[str] = ()
) -> web.Application:
    """The console's routes; `trusted_proxies` (addresses or networks) are the proxies whose
    X-Forwarded-For names the client that sign-in limits count against."""
    app = web.Application(middlewares=[errors, signed_in], client_max_size=MAX_FORM_BYTES)
    app.on_response_prepare.append(security_headers)
    app[API] = api
    app[SEAL] = seal
    app[PROXIES] = trusted_networks(trusted_proxies)
    app[alerts.STREAMS] = alerts.StreamSlots()
    app[ATTEMPTS] = AttemptLimiter(
        max_failures=LOGIN_FAILURES, window_s=LOGIN_WINDOW_S, what="failed sign-ins"
    )
    r = app.router
    r.add_get("/", home)
    r.add_get("/healthz", healthz)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/fleet", fleet.fleet_page)
    r.add_get("/devices/{device}", fleet.device_page)
    r.add_get("/rollouts", rollouts.rollouts_page)
    r.add_get("/rollouts/{rollout}", rollouts.rollout_page)
    r.add_post("/rollouts/{rollout}/{action}", rollouts.rollout_action)
    r.add_get("/alerts", alerts.alerts_page)
    r.add_get("/alerts/{alert}", alerts.alert_page)
    r.add_post("/alerts/{alert}/{action}", alerts.alert_action)
    r.add_get("/live/rollouts", rollouts.rollouts_live)
    r.add_get("/live/rollouts/{rollout}", rollouts.rollout_live)
    r.add_get("/live/alerts", alerts.alerts_live)
    r.add_get("/live/alerts/watch", alerts.alerts_watch)
    r.add_static("/static", STATIC)
    return app


class ConsoleServer:
    """The console on its own port, in the control plane's event loop; it reaches the
    operator API over TLS like any client."""

    def __init__(
        self,
        listen: str,
        api: OperatorApi,
        seal: SessionSeal,
        trusted_proxies: Iterable[str] = (),
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.listen = listen
        self.api = api
        self.app = make_app(api, seal, trusted_proxies)
        self.request_timeout_s = request_timeout_s
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, int(port)), family=family)
        except OSError as exc:
            raise LocalStateError(
                f"cannot listen on {self.listen} for the console: {exc.strerror}"
            ) from None
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
            # aiohttp's keep-alive timer runs from the connection's start too, and closes it
            # when no complete request has arrived by then (its default is an hour).
            keepalive_timeout=self.request_timeout_s,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("console serving on http://%s:%d/", host or "0.0.0.0", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.api.close()
