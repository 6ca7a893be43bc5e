"""Rollout pages: waves and per-device progress refreshed live, gate results, and pause,
resume and abort through the operator API."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from urllib.parse import quote

from aiohttp import web

from cloud.console.context import (
    calls_of,
    field,
    form_of,
    html,
    notice_of,
    refused,
    session_of,
)
from cloud.console.markup import Markup, action_form, esc, join, page, table, tag, text_input, when
from edge_agent.errors import AutoglmError, Unauthenticated
from protos.autoglm.v1 import operator_pb2

REFRESH_MS = 1000
clock = time.time  # the live part's version changes every minute of it (tests fix it)
STATES = {
    operator_pb2.Rollout.STATE_RUNNING: "running",
    operator_pb2.Rollout.STATE_PAUSED: "paused",
    operator_pb2.Rollout.STATE_SUCCEEDED: "succeeded",
    operator_pb2.Rollout.STATE_ABORTED: "aborted",
    operator_pb2.Rollout.STATE_PARTIAL: "partial",
}
ACTIVE = (operator_pb2.Rollout.STATE_RUNNING, operator_pb2.Rollout.STATE_PAUSED)
ACTIONS = ("pause", "resume", "abort")


def state_name(rollout: operator_pb2.Rollout) -> str:
    return STATES.get(rollout.state, "unknown")


def progress(rollout: operator_pb2.Rollout) -> tuple[int, int, int]:
    """(updated devices, targeted devices, whole percent updated)."""
    total = len(rollout.devices) or sum(w.target_devices for w in rollout.waves)
    updated = sum(1 for d in rollout.devices if d.state == "updated")
    if not rollout.devices:
        updated = sum(w.updated for w in rollout.waves)
    percent = (100 * updated) // total if total else 0
    return updated, total, percent


def progress_bar(rollout: operator_pb2.Rollout) -> Markup:
    updated, total, percent = progress(rollout)
    return tag(
        "span",
        tag("progress", f"{percent} %", value=updated, max=max(total, 1)),
        " ",
        tag("span", f"{percent} %", class_="percent", data_percent=percent),
        f" ({updated} of {total} devices updated)",
        class_="progress",
    )


def _summary_rows(rollouts: list[operator_pb2.Rollout], now: dt.datetime) -> list[list[Markup]]:
    return [
        [
            tag("a", r.id[:8], href=f"/rollouts/{quote(r.id)}"),
            esc(f"{r.model_name}:{r.model_version}"),
            esc(r.selector or "(all)"),
            tag("span", state_name(r), class_=f"state {state_name(r)}"),
            esc(f"{min(r.current_wave + 1, len(r.waves))} of {len(r.waves)}"),
            progress_bar(r),
            when(r.created_at if r.HasField("created_at") else None, now),
        ]
        for r in rollouts
    ]


def final_marker(final: bool) -> Markup:
    """Tells the page's script to stop refreshing: nothing will change any more."""
    return tag("span", "", hidden=True, data_final_marker="1" if final else "0")


def _rollouts_inner(rollouts: list[operator_pb2.Rollout]) -> Markup:
    now = dt.datetime.now(dt.UTC)
    headers = ["Rollout", "Model", "Selector", "State", "Wave", "Progress", "Created"]
    # The list never stops refreshing: a new rollout may start at any time.
    if not rollouts:
        return tag("p", "No rollouts yet.", class_="empty")
    return table(headers, _summary_rows(rollouts, now), id="rollouts")


async def rollouts_page(request: web.Request) -> web.Response:
    rollouts = await calls_of(request).list_rollouts()
    # Rendered in a worker thread, as all pages over many devices: this event loop also
    # serves the devices' sessions.
    body = tag(
        "div",
        await asyncio.to_thread(_rollouts_inner, rollouts),
        id="rollouts-live",
        data_refresh="/live/rollouts",
        data_interval=2 * REFRESH_MS,
    )
    return html(page("Rollouts", body, session_of(request).csrf, "/rollouts"))


async def rollouts_live(request: web.Request) -> web.Response:
    rollouts = await calls_of(request).list_rollouts()
    return html(await asyncio.to_thread(_rollouts_inner, rollouts))


def _detail(rollout: operator_pb2.Rollout) -> Markup:
    """The live part of a rollout's page: state, waves, devices, gates."""
    now = dt.datetime.now(dt.UTC)
    waves = table(
        ["Wave", "Size", "Devices", "Updated", "Failed", "Started", "Soak until"],
        [
            [
                esc(
                    f"{w.index + 1}"
                    + (
                        " (current)"
                        if w.index == rollout.current_wave and rollout.state in ACTIVE
                        else ""
                    )
                ),
                w.size,
                w.target_devices,
                w.updated,
                w.failed,
                when(w.started_at if w.HasField("started_at") else None, now),
                when(w.soak_until if w.HasField("soak_until") else None, now),
            ]
            for w in rollout.waves
        ],
        id="waves",
    )
    g = rollout.gates
    min_windows = g.min_shadow_windows

    def judged(value: float, limit: float, worse_when_above: bool, windows: int) -> Markup:
        if windows == 0 or windows < min_windows or limit <= 0:
            return esc(f"{value:.2f}" if windows else "-")
        fails = value > limit if worse_when_above else value < limit
        return tag(
            "span",
            f"{value:.2f}",
            class_="bad" if fails else "good",
            title=f"gate {'max' if worse_when_above else 'min'} {limit:g}",
        )

    devices = table(
        [
            "Device",
            "Wave",
            "State",
            "Detail",
            "Previous",
            "Shadow windows",
            "Agreement",
            "Alert-rate diff",
            "Latency ratio",
        ],
        [
            [
                tag("a", d.device_name or d.device_id, href=f"/devices/{quote(d.device_id)}"),
                d.wave + 1,
                tag("span", d.state, class_=f"state {d.state}"),
                d.detail or "-",
                d.previous_version or "-",
                d.shadow_windows,
                judged(d.shadow_agreement, g.min_shadow_agreement, False, d.shadow_windows),
                judged(
                    abs(d.shadow_alert_rate_difference),
                    g.max_alert_rate_difference,
                    True,
                    d.shadow_windows,
                ),
                esc(f"{d.latency_ratio:.2f}" if d.latency_ratio else "-"),
            ]
            for d in sorted(rollout.devices, key=lambda d: (d.wave, d.device_name))
        ],
        id="rollout-devices",
    )
    failed = sum(1 for d in rollout.devices if d.state == "failed")
    gates = table(
        ["Gate", "Limit", "Now"],
        [
            [
                "Failed updates (fraction)",
                f"{g.max_failure_fraction:g}",
                f"{failed} of {len(rollout.devices)}",
            ],
            ["Shadow agreement (min)", f"{g.min_shadow_agreement:g}", "per device above"],
            ["Alert-rate difference (max)", f"{g.max_alert_rate_difference:g}", "per device above"],
            [
                "Latency regression, p99 ratio (max)",
                f"{g.max_latency_regression:g}",
                "per device above",
            ],
            ["Shadow windows before judging", g.min_shadow_windows, ""],
        ],
        id="gates",
    )
    final = rollout.state not in ACTIVE
    return join(
        [
            tag(
                "p",
                "State: ",
                tag(
                    "strong",
                    state_name(rollout),
                    class_=f"state {state_name(rollout)}",
                    id="rollout-state",
                ),
                " · ",
                progress_bar(rollout),
            ),
            tag("p", f"Reason: {rollout.reason}", class_="reason") if rollout.reason else "",
            tag("p", f"Waiting for: {rollout.waiting_for}") if rollout.waiting_for else "",
            tag("h2", "Waves"),
            waves,
            tag("h2", "Devices"),
            devices,
            tag("h2", "Gates"),
            gates,
            final_marker(final),
        ]
    )


async def render_rollout(
    request: web.Request, rollout_id: str, error: str = "", status: int = 200
) -> web.Response:
    rollout = await calls_of(request).get_rollout(rollout_id)
    csrf = session_of(request).csrf
    live = tag(
        "div",
        await asyncio.to_thread(_detail, rollout),
        id="rollout-live",
        data_refresh=f"/live/rollouts/{quote(rollout.id)}",
        data_interval=REFRESH_MS,
        data_version=await asyncio.to_thread(version_of, rollout, clock()),
    )
    reason = text_input("reason", "reason (optional)")
    actions = tag(
        "section",
        tag("h2", "Actions"),
        action_form(f"/rollouts/{quote(rollout.id)}/pause", csrf, "Pause", reason),
        action_form(f"/rollouts/{quote(rollout.id)}/resume", csrf, "Resume", reason),
        action_form(f"/rollouts/{quote(rollout.id)}/abort", csrf, "Abort", reason, danger=True),
        class_="actions",
    )
    body = join(
        [
            tag(
                "p",
                f"Model {rollout.model_name}:{rollout.model_version} to "
                f"{rollout.selector or 'every device'}; waves "
                f"{', '.join(w.size for w in rollout.waves)}; soak {rollout.soak_seconds} s",
            ),
            live,
            actions,
        ]
    )
    title = f"Rollout {rollout.id[:8]}"
    notice = notice_of(request) if not error else ""
    return html(page(title, body, csrf, "/rollouts", error, notice), status)


async def rollout_page(request: web.Request) -> web.Response:
    return await render_rollout(request, request.match_info["rollout"])


def version_of(rollout: operator_pb2.Rollout, now: float) -> str:
    """The ETag of the live part: it changes with the rollout, and every minute (the times'
    "ago" titles), not otherwise."""
    digest = hashlib.sha256(rollout.SerializeToString(deterministic=True))
    digest.update(str(int(now // 60)).encode())
    return f'"{digest.hexdigest()[:32]}"'


def _unchanged(request: web.Request, etag: str) -> bool:
    sent = request.headers.get("If-None-Match", "")
    return etag in (t.strip().removeprefix("W/") for t in sent.split(","))


async def rollout_live(request: web.Request) -> web.StreamResponse:
    """The live part of a rollout's page, refreshed by the page every REFRESH_MS: answered
    304 when nothing changed since the version the page holds, else rendered in a worker
    thread (thousands of devices take a while; this loop also serves device sessions)."""
    rollout = await calls_of(request).get_rollout(request.match_info["rollout"])
    etag = await asyncio.to_thread(version_of, rollout, clock())
    if _unchanged(request, etag):
        return web.Response(status=304, headers={"ETag": etag})
    response = html(await asyncio.to_thread(_detail, rollout))
    response.headers["ETag"] = etag
    return response


async def rollout_action(request: web.Request) -> web.StreamResponse:
    rollout_id, action = request.match_info["rollout"], request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound(text="no such action")
    try:
        reason = field(await form_of(request), "reason")
        await calls_of(request).rollout_action(action, rollout_id, reason)
    except Unauthenticated:
        raise
    except AutoglmError as exc:
        return await refused(
            lambda text, status: render_rollout(request, rollout_id, text, status), exc
        )
    raise web.HTTPSeeOther(f"/rollouts/{quote(rollout_id)}?done={action}")
