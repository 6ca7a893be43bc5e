"""Alert pages: the live list (the API's watch stream, as server-sent events), one alert with
its score timeline and top sensors' traces, and acknowledge, resolve and shelve with a
verdict through the operator API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

from aiohttp import web

from cloud.cli.alert_cmds import STATE_NAMES, STATES
from cloud.cli.output import parse_duration
from cloud.console.captures import alert_window, window_chart
from cloud.console.charts import Series, Span, line_chart
from cloud.console.context import (
    calls_of,
    error_text,
    field,
    form_of,
    html,
    http_status,
    moved,
    notice_of,
    query,
    refused,
    session_of,
)
from cloud.console.markup import (
    Markup,
    action_form,
    esc,
    join,
    page,
    select,
    tag,
    text_input,
    when,
)
from cloud.console.sessions import ConsoleSession
from cloud.domain import VERDICTS
from edge_agent.errors import (
    AutoglmError,
    InvalidInput,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from protos.autoglm.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)

LIST_LIMIT = 200
KEEPALIVE_S = 15.0
AROUND = dt.timedelta(minutes=10)  # predictions shown before and after an alert
TIMELINE_LIMIT = 3000
TOP_SENSORS = 5
ACTIONS = ("ack", "resolve", "shelve", "unshelve")
VERDICT_CHOICES = [("", "no verdict yet"), *((v, f"verdict: {v}") for v in VERDICTS)]
# Live alert streams (each a WatchAlerts stream on the API) one signed-in browser, and one
# operator over all their sign-ins, may hold open on this console; more are refused (429).
MAX_STREAMS_PER_SESSION = 4
MAX_STREAMS_PER_OPERATOR = 16


class StreamSlots:
    """The live alert streams open now, per console session and per operator token."""

    def __init__(
        self,
        per_session: int = MAX_STREAMS_PER_SESSION,
        per_operator: int = MAX_STREAMS_PER_OPERATOR,
    ) -> None:
        self.per_session = per_session
        self.per_operator = per_operator
        self._open: Counter[tuple[str, str]] = Counter()

    @contextlib.contextmanager
    def hold(self, session: ConsoleSession) -> Iterator[None]:
        """One stream of `session` while the block runs; RateLimited past either limit."""
        # Keyed by digests: the counts keep no token or CSRF secret in memory of their own.
        keys = [
            ("session", hashlib.sha256(session.csrf.encode()).hexdigest()),
            ("operator", hashlib.sha256(session.token.encode()).hexdigest()),
        ]
        if self._open[keys[0]] >= self.per_session:
            raise RateLimited(
                f"this browser session has {self.per_session} live alert pages open, the most "
                "allowed; close one and reload"
            )
        if self._open[keys[1]] >= self.per_operator:
            raise RateLimited(
                f"this operator has {self.per_operator} live alert pages open over all sign-ins, "
                "the most allowed; close one and reload"
            )
        for key in keys:
            self._open[key] += 1
        try:
            yield
        finally:
            for key in keys:
                self._open[key] -= 1
                if not self._open[key]:
                    del self._open[key]


STREAMS: web.AppKey[StreamSlots] = web.AppKey("alert_streams", StreamSlots)


def alert_row(alert: operator_pb2.Alert, now: dt.datetime) -> Markup:
    state = STATE_NAMES.get(alert.state, "unknown")
    if alert.HasField("shelved_until"):
        state += " (shelved)"
    cells = [
        tag("a", alert.id[:8], href=f"/alerts/{quote(alert.id)}"),
        tag("span", alert.severity or "-", class_=f"severity {alert.severity}"),
        tag("span", state, class_=f"state {STATE_NAMES.get(alert.state, '')}"),
        tag("a", alert.device_name or alert.device_id, href=f"/devices/{quote(alert.device_id)}"),
        esc(alert.asset),
        esc(alert.fault),
        esc(f"{alert.peak_score:.2f}"),
        esc(", ".join(s.sensor for s in alert.top_sensors[:3]) or "-"),
        when(alert.first_seen if alert.HasField("first_seen") else None, now),
        when(alert.last_seen if alert.HasField("last_seen") else None, now),
        esc(alert.verdict or "-"),
    ]
    return tag("tr", *(tag("td", c) for c in cells), data_alert_id=alert.id)


HEADERS = [
    "Alert",
    "Severity",
    "State",
    "Device",
    "Asset",
    "Fault",
    "Peak",
    "Top sensors",
    "First seen",
    "Last seen",
    "Verdict",
]


def _list_request(request: web.Request) -> operator_pb2.ListAlertsRequest:
    state = query(request, "state", 20)
    if state and state not in STATES:
        raise InvalidInput(f"state '{state}' is not one of {', '.join(STATES)}")
    return operator_pb2.ListAlertsRequest(
        state=STATES.get(state, operator_pb2.Alert.STATE_UNSPECIFIED),
        device=query(request, "device", 200),
        verdict=query(request, "verdict", 20),
        limit=LIST_LIMIT,
    )


async def _rows(request: web.Request) -> Markup:
    alerts = await calls_of(request).list_alerts(_list_request(request))
    now = dt.datetime.now(dt.UTC)
    return join(alert_row(a, now) for a in alerts)


async def alerts_page(request: web.Request) -> web.Response:
    rows = await _rows(request)
    state = query(request, "state", 20)
    filters = tag(
        "form",
        select("state", [("", "any state"), *((s, s) for s in STATES)], "state", state),
        tag("input", type="hidden", name="device", value=query(request, "device", 200)),
        tag("button", "Filter", type="submit"),
        method="get",
        action="/alerts",
        class_="filter",
    )
    listing = tag(
        "table",
        tag("thead", tag("tr", *(tag("th", h) for h in HEADERS))),
        tag("tbody", rows, id="alert-rows", data_refresh=f"/live/alerts?{request.query_string}"),
        id="alerts",
        data_watch="/live/alerts/watch",
    )
    live = tag("p", "Live: changes appear as they happen.", id="watch-status", class_="summary")
    body = join([filters, live, listing])
    return html(page("Alerts", body, session_of(request).csrf, "/alerts"))


async def alerts_live(request: web.Request) -> web.Response:
    """The list's rows (the page reloads them after its watch stream reconnects)."""
    return html(await _rows(request))


async def alerts_watch(request: web.Request) -> web.StreamResponse:
    """The watch stream as server-sent events: `ready` once the API's stream has started
    (no change after it is missed), then one `alert` per change, each with its row rendered
    as on the list page. A browser past its cap of live pages (429) is answered with a stream
    of one `failed` event that says so: an EventSource learns nothing of a refused response
    but that it closed, as it does when a proxy answers 502 during a restart."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(request.app[STREAMS].hold(session_of(request)))
        except RateLimited as exc:
            return await _refused(request, exc)
        return await _watch(request)


def _event(name: str, doc: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode()


def _failed(error: AutoglmError) -> bytes:
    return _event("failed", {"error": error_text(error), "status": http_status(error)})


async def _refused(request: web.Request, error: RateLimited) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    # A page whose script ignores `failed` (one loaded before this) tries again only slowly.
    await response.write(b"retry: 60000\n\n" + _failed(error))
    return response


async def _watch(request: web.Request) -> web.StreamResponse:
    calls = calls_of(request)
    queue: asyncio.Queue[operator_pb2.Alert | AutoglmError] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for alert in calls.watch_alerts():
                await queue.put(alert)
            await queue.put(Unavailable("the alert stream ended; reload the page"))
        except AutoglmError as exc:
            await queue.put(exc)
        except Exception:  # the page must not say "live" over a dead stream
            log.exception("console: watching alerts failed")
            await queue.put(Unavailable("watching alerts failed; reload the page"))

    task = asyncio.create_task(pump())
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if isinstance(item, AutoglmError):
                await response.write(_failed(item))
                break
            if not item.id:  # the API's marker: watching from here on
                await response.write(b"event: ready\ndata: {}\n\n")
                continue
            row = alert_row(item, dt.datetime.now(dt.UTC))
            await response.write(_event("alert", {"id": item.id, "row": str(row)}))
    except ConnectionResetError:
        pass  # the browser went away (a cancellation, when it does, ends the stream too)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return response


def _timeline(
    alert: operator_pb2.Alert, predictions: list[agent_pb2.Prediction]
) -> tuple[Markup, Markup]:
    """The score chart and the top sensors' contribution traces around the alert."""
    first = alert.first_seen.ToNanoseconds() / 1e9
    end = alert.resolved_at if alert.HasField("resolved_at") else alert.last_seen
    span = Span(first, max(end.ToNanoseconds() / 1e9, first), "the alert")
    scores = Series(
        f"{alert.asset} score",
        [(p.window_end.ToNanoseconds() / 1e9, p.score) for p in predictions],
    )
    score_chart = line_chart(
        f"Score of {alert.asset} around the alert (1.0 = alert threshold)",
        [scores],
        threshold=1.0,
        span=span,
    )
    sensors = [s.sensor for s in alert.top_sensors[:TOP_SENSORS]]
    traces = [
        Series(
            sensor,
            [
                (p.window_end.ToNanoseconds() / 1e9, p.contributions[sensor])
                for p in predictions
                if sensor in p.contributions
            ],
        )
        for sensor in sensors
    ]
    sensor_chart = line_chart("Top sensors' contributions per window", traces, span=span)
    return score_chart, sensor_chart


async def render_alert(
    request: web.Request, alert_id: str, error: str = "", status: int = 200
) -> web.Response:
    calls = calls_of(request)
    alert = await calls.get_alert(alert_id)
    now = dt.datetime.now(dt.UTC)
    wanted = operator_pb2.QueryPredictionsRequest(
        device=alert.device_id, asset=alert.asset, limit=TIMELINE_LIMIT
    )
    wanted.since.FromDatetime(moved(alert.first_seen.ToDatetime(tzinfo=dt.UTC), -AROUND))
    if alert.HasField("resolved_at"):
        wanted.until.FromDatetime(moved(alert.resolved_at.ToDatetime(tzinfo=dt.UTC), AROUND))
    score_chart, sensor_chart = _timeline(alert, await calls.predictions(wanted))
    captured = window_chart(alert, await alert_window(calls, alert))
    facts: list[tuple[str, Markup | str]] = [
        ("State", STATE_NAMES.get(alert.state, "unknown")),
        ("Severity", alert.severity or "-"),
        (
            "Device",
            tag(
                "a", alert.device_name or alert.device_id, href=f"/devices/{quote(alert.device_id)}"
            ),
        ),
        ("Asset", alert.asset),
        ("Fault", alert.fault),
        ("Peak score", f"{alert.peak_score:.2f}"),
        ("Model", alert.model_version or "-"),
        ("Raise events", str(alert.raised_events)),
        ("First seen", when(alert.first_seen, now)),
        ("Last seen", when(alert.last_seen, now)),
        (
            "Top sensors",
            ", ".join(f"{s.sensor} ({s.contribution:.2f})" for s in alert.top_sensors) or "-",
        ),
        (
            "Verdict",
            alert.verdict + (f" ({alert.fault_type})" if alert.fault_type else "")
            if alert.verdict
            else "-",
        ),
    ]
    if alert.acknowledged_by:
        facts.append(("Acknowledged by", alert.acknowledged_by))
    if alert.HasField("resolved_at"):
        facts.append(("Resolved", join([when(alert.resolved_at, now), f" by {alert.resolved_by}"])))
    if alert.HasField("shelved_until"):
        facts.append(
            (
                "Shelved",
                join(
                    [
                        f"by {alert.shelved_by} until ",
                        when(alert.shelved_until, now),
                        f": {alert.shelve_reason}",
                    ]
                ),
            )
        )
    if alert.suppressed_by:
        facts.append(("Not delivered now", alert.suppressed_by))
    notes = tag("ul", *(tag("li", n) for n in alert.notes), class_="notes") if alert.notes else ""
    body = join(
        [
            tag(
                "dl",
                *(join([tag("dt", k), tag("dd", v)]) for k, v in facts),
                class_="facts",
                id="alert-facts",
            ),
            notes,
            score_chart,
            sensor_chart,
            captured,
            _actions(alert, session_of(request).csrf),
        ]
    )
    title = f"Alert {alert.id[:8]}: {alert.device_name or alert.device_id}/{alert.asset}"
    notice = notice_of(request) if not error else ""
    return html(page(title, body, session_of(request).csrf, "/alerts", error, notice), status)


def _actions(alert: operator_pb2.Alert, csrf: str) -> Markup:
    base = f"/alerts/{quote(alert.id)}"

    def judged(action: str, button: str) -> Markup:
        return action_form(
            f"{base}/{action}",
            csrf,
            button,
            select("verdict", VERDICT_CHOICES, "verdict"),
            text_input("fault_type", "fault found (optional)", size=18),
            text_input("note", "note (optional)"),
        )

    shelve = (
        action_form(f"{base}/unshelve", csrf, "Unshelve")
        if alert.HasField("shelved_until")
        else action_form(
            f"{base}/shelve",
            csrf,
            "Shelve",
            text_input("for", "for, e.g. 8h", required=True, size=10),
            text_input("reason", "why it may stay quiet", required=True),
        )
    )
    return tag(
        "section",
        tag("h2", "Actions"),
        judged("ack", "Acknowledge"),
        judged("resolve", "Resolve"),
        shelve,
        class_="actions",
    )


async def alert_page(request: web.Request) -> web.Response:
    return await render_alert(request, request.match_info["alert"])


async def alert_action(request: web.Request) -> web.StreamResponse:
    alert_id, action = request.match_info["alert"], request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound(text="no such action")
    calls = calls_of(request)
    try:
        form = await form_of(request)
        if action in ("ack", "resolve"):
            verdict = field(form, "verdict", 20)
            if verdict and verdict not in VERDICTS:
                raise InvalidInput(f"verdict '{verdict}' is not one of {', '.join(VERDICTS)}")
            note, fault_type = field(form, "note"), field(form, "fault_type", 100)
            act = calls.ack_alert if action == "ack" else calls.resolve_alert
            await act(alert_id, note, verdict, fault_type)
        elif action == "shelve":
            try:
                seconds = parse_duration(field(form, "for", 20))
            except ValueError as exc:
                raise InvalidInput(f"shelve for: {exc}") from None
            await calls.shelve_alert(alert_id, int(min(seconds, 2**32 - 1)), field(form, "reason"))
        else:
            await calls.unshelve_alert(alert_id)
    except Unauthenticated:
        raise
    except AutoglmError as exc:
        return await refused(
            lambda text, status: render_alert(request, alert_id, text, status), exc
        )
    raise web.HTTPSeeOther(f"/alerts/{quote(alert_id)}?done={action}")
