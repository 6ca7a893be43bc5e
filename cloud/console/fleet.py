"""Fleet pages: every device with its state, labels, profile, models, certificate and drift;
one device's health and recent predictions."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections import defaultdict
from urllib.parse import urlencode

from aiohttp import web

from cloud.console.charts import Series, line_chart
from cloud.console.context import calls_of, html, query, session_of
from cloud.console.markup import Markup, esc, join, labels, page, table, tag, when
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import agent_pb2, operator_pb2

DEVICE_PREDICTIONS = 600  # the newest windows on the device page's chart
PAGE_SIZE = 500  # devices on one page of the fleet list
# When an asset's model health counts as drifting (the console's flag; `autoglm model health`
# ranks the same figures): its inputs moved by this many calibration deviations, their spread
# changed by this factor either way, this share of inputs is missing, or the median score sits
# this close to the alert threshold (1.0).
DRIFT_SHIFT_SD = 3.0
DRIFT_SPREAD = 2.0
DRIFT_MASKED = 0.2
DRIFT_SCORE_MEDIAN = 0.8
STATE_NAMES = {
    operator_pb2.Device.STATE_PENDING: "pending",
    operator_pb2.Device.STATE_ACTIVE: "active",
    operator_pb2.Device.STATE_REVOKED: "revoked",
}


def drift_reasons(asset: str, d: agent_pb2.AssetDrift) -> list[str]:
    """Why `asset`'s model health counts as drifting; [] when it does not."""
    reasons = []
    if d.input_shift >= DRIFT_SHIFT_SD:
        reasons.append(f"{asset}: inputs shifted {d.input_shift:.1f} sd ({d.input_shift_sensor})")
    if d.spread_ratio >= DRIFT_SPREAD:
        reasons.append(f"{asset}: spread x{d.spread_ratio:.1f}")
    if d.masked_fraction >= DRIFT_MASKED:
        reasons.append(f"{asset}: {100 * d.masked_fraction:.0f} % of inputs missing")
    if d.score_median >= DRIFT_SCORE_MEDIAN:
        reasons.append(f"{asset}: median score {d.score_median:.2f}")
    return reasons


def device_state(device: operator_pb2.Device) -> str:
    if device.state == operator_pb2.Device.STATE_ACTIVE:
        return "online" if device.online else "offline"
    return STATE_NAMES.get(device.state, "unknown")


def serving(device: operator_pb2.Device) -> str:
    status = device.status
    if not status.model_version:
        return "-"
    slot = f" (slot {status.slot})" if status.slot else ""
    return f"{status.model_name or 'model'}:{status.model_version}{slot}"


def cert_expiry(device: operator_pb2.Device, now: dt.datetime) -> Markup:
    if not device.HasField("cert_not_after"):
        return esc("-")
    at = device.cert_not_after.ToDatetime(tzinfo=dt.UTC)
    left = (at - now).total_seconds()
    text = (
        "EXPIRED"
        if left <= 0
        else (f"in {left / 86_400:.0f} d" if left >= 86_400 else f"in {left / 3600:.1f} h")
    )
    return tag(
        "span", text, title=f"{at:%Y-%m-%d %H:%M} UTC", class_="bad" if left < 7 * 86_400 else None
    )


def shadows(rollouts: list[operator_pb2.Rollout]) -> dict[str, str]:
    """Device id → the model version it runs in shadow for an active rollout."""
    out = {}
    for r in rollouts:
        for d in r.devices:
            if d.state == "shadowing":
                out[d.device_id] = f"{r.model_name}:{r.model_version}"
    return out


def page_number(request: web.Request) -> int:
    """The ?page= asked for, from 1; InvalidInput when it is not a page number."""
    text = query(request, "page", 9) or "1"
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if re.fullmatch(r"[0-9]{1,9}", text) is None or int(text) < 1:
        raise InvalidInput(f"page {text!r} is not a page number (1, 2, ...)")
    return int(text)


async def fleet_page(request: web.Request) -> web.Response:
    selector = query(request, "selector", 1000)
    wanted = page_number(request)
    calls = calls_of(request)
    devices = await calls.list_devices(selector)
    active = await calls.list_rollouts(active_only=True)
    csrf = session_of(request).csrf
    # Rendered in a worker thread: a large fleet takes a while, and this event loop also
    # serves the devices' sessions.
    body = await asyncio.to_thread(render_fleet, devices, active, selector, wanted, csrf)
    return html(body)


def render_fleet(
    devices: list[operator_pb2.Device],
    rollouts: list[operator_pb2.Rollout],
    selector: str,
    wanted: int,
    csrf: str,
) -> Markup:
    """The fleet page: page `wanted` (the last when past it) of PAGE_SIZE devices by name."""
    shadow = shadows(rollouts)
    now = dt.datetime.now(dt.UTC)
    pages = max(1, -(-len(devices) // PAGE_SIZE))
    number = min(wanted, pages)
    ordered = sorted(devices, key=lambda d: (d.name, d.id))
    shown = ordered[(number - 1) * PAGE_SIZE : number * PAGE_SIZE]
    rows = []
    for d in shown:
        drift = [r for a, x in sorted(d.status.health.drift.items()) for r in drift_reasons(a, x)]
        rows.append(
            [
                tag("a", d.name, href=f"/devices/{d.id}"),
                tag("span", device_state(d), class_=f"state {device_state(d)}"),
                labels(d.labels),
                d.profile or "-",
                serving(d),
                d.desired_model_version or "-",
                shadow.get(d.id, "-"),
                when(d.last_seen if d.HasField("last_seen") else None, now),
                cert_expiry(d, now),
                tag("span", "drift", class_="flag", title="; ".join(drift)) if drift else "-",
            ]
        )
    search = tag(
        "form",
        tag(
            "input",
            type="text",
            name="selector",
            value=selector,
            placeholder="label selector, e.g. site=plant-a,line=2",
            size=40,
            maxlength=1000,
            aria_label="label selector",
        ),
        tag("button", "Filter", type="submit"),
        method="get",
        action="/fleet",
        class_="filter",
    )
    showing = (
        f"; showing {(number - 1) * PAGE_SIZE + 1}-{(number - 1) * PAGE_SIZE + len(shown)}"
        f" (page {number} of {pages})"
        if pages > 1
        else ""
    )
    summary = tag(
        "p",
        f"{len(devices)} device(s)" + (f" matching {selector}" if selector else "") + showing,
        class_="summary",
    )
    headers = [
        "Name",
        "State",
        "Labels",
        "Profile",
        "Serving",
        "Desired",
        "Shadow",
        "Last seen",
        "Cert expires",
        "Drift",
    ]
    pager = _pager(selector, number, pages)
    body = join([search, summary, pager, table(headers, rows, id="devices"), pager])
    return page("Fleet", body, csrf, "/fleet")


def _pager(selector: str, number: int, pages: int) -> Markup:
    """Previous and next page links (nothing when one page holds every device)."""
    if pages == 1:
        return Markup("")

    def link(to: int, text: str, rel: str) -> Markup:
        target = "/fleet?" + urlencode({**({"selector": selector} if selector else {}), "page": to})
        return tag("a", text, href=target, rel=rel)

    return tag(
        "nav",
        link(number - 1, "Previous page", "prev") if number > 1 else "",
        f" page {number} of {pages} ",
        link(number + 1, "Next page", "next") if number < pages else "",
        class_="pager",
        aria_label="fleet pages",
    )


async def device_page(request: web.Request) -> web.Response:
    calls = calls_of(request)
    device = await calls.get_device(request.match_info["device"])
    now = dt.datetime.now(dt.UTC)
    predictions = await calls.predictions(
        operator_pb2.QueryPredictionsRequest(device=device.id, limit=DEVICE_PREDICTIONS)
    )
    by_asset: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in predictions:
        by_asset[p.asset].append((p.window_end.ToNanoseconds() / 1e9, p.score))
    chart = line_chart(
        f"Window scores, newest {len(predictions)} windows (1.0 = alert threshold)",
        [Series(asset, points) for asset, points in sorted(by_asset.items())],
        threshold=1.0,
    )
    facts = [
        ("Id", device.id),
        ("State", device_state(device)),
        ("Labels", labels(device.labels)),
        ("Profile", device.profile or "-"),
        ("Agent", device.agent_version or "-"),
        ("Serving", serving(device)),
        ("Backend", device.status.inference_backend or "-"),
        ("Desired", device.desired_model_version or "-"),
        ("Last seen", when(device.last_seen if device.HasField("last_seen") else None, now)),
        ("Enrolled", when(device.enrolled_at if device.HasField("enrolled_at") else None, now)),
        ("Cert expires", cert_expiry(device, now)),
        ("Host", " ".join(x for x in (device.host.hostname, device.host.arch) if x) or "-"),
    ]
    body = join(
        [
            tag("dl", *(join([tag("dt", k), tag("dd", v)]) for k, v in facts), class_="facts"),
            tag("h2", "Health"),
            _health(device.status.health),
            tag("h2", "Recent predictions"),
            chart,
            tag("p", tag("a", "Alerts of this device", href=f"/alerts?device={device.id}")),
        ]
    )
    title = f"Device {device.name}"
    return html(page(title, body, session_of(request).csrf, "/fleet"))


def _health(h: agent_pb2.AgentHealth) -> Markup:
    if h.ByteSize() == 0:
        return tag("p", "No health report from this device yet.", class_="empty")
    figures = table(
        [
            "Latency p50",
            "Latency p99",
            "Windows scored",
            "Alerts raised",
            "Errors",
            "Outbox",
            "Disk free",
        ],
        [
            [
                f"{h.inference_latency_p50_ms:.1f} ms",
                f"{h.inference_latency_p99_ms:.1f} ms",
                h.windows_scored,
                h.alerts_raised,
                h.errors,
                f"{h.outbox_depth} records, {h.outbox_bytes / 1e6:.1f} MB",
                f"{h.disk_free_bytes / 1e9:.1f} GB",
            ]
        ],
        id="health",
    )
    assets = sorted(set(h.ingest_rate_per_s) | set(h.drift))
    rows = []
    for asset in assets:
        d = h.drift.get(asset)
        reasons = drift_reasons(asset, d) if d is not None else []
        rows.append(
            [
                asset,
                f"{h.ingest_rate_per_s.get(asset, 0.0):.1f}/s",
                f"{d.input_shift:.1f} sd ({d.input_shift_sensor or '-'})" if d else "-",
                f"x{d.spread_ratio:.2f}" if d else "-",
                f"{100 * d.masked_fraction:.0f} %" if d else "-",
                f"{d.score_median:.2f}" if d else "-",
                f"{d.alerts_per_day:.1f}" if d else "-",
                tag("span", "drift", class_="flag", title="; ".join(reasons)) if reasons else "ok",
            ]
        )
    per_asset = table(
        ["Asset", "Ingest", "Input shift", "Spread", "Masked", "Score p50", "Alerts/day", "Drift"],
        rows,
        id="assets",
    )
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(h.dropped_by_reason.items()))
    return join([figures, per_asset, tag("p", f"Dropped readings: {dropped}") if dropped else ""])
