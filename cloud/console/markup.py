"""HTML built from escaped pieces: every value is escaped unless it is already `Markup`.

Device names, labels, alert fields and notes come from devices and operators, so nothing is
interpolated raw: `esc` escapes text, `Markup` marks HTML this module (or a caller through
`tag`/`join`) built from escaped parts."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp


class Markup(str):
    """HTML that is safe to insert as it is."""

    __slots__ = ()


Content = Markup | str | int | float | None


def esc(value: Content) -> Markup:
    """`value` as HTML text (Markup as it is)."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[Content], sep: str = "") -> Markup:
    return Markup(esc(sep).join(esc(p) for p in parts))


def tag(element: str, /, *children: Content, **attrs: str | int | float | bool | None) -> Markup:
    """`<name attrs>children</name>`; attribute names: `class_` → class, `data_x` → data-x.
    False/None attributes are left out, True ones written bare."""
    rendered = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        rendered.append(f" {attr}" if value is True else f' {attr}="{esc(value)}"')
    inner = join(children)
    if element in ("input", "meta", "link", "br"):
        return Markup(f"<{element}{''.join(rendered)}>")
    return Markup(f"<{element}{''.join(rendered)}>{inner}</{element}>")


def table(headers: Iterable[Content], rows: Iterable[Iterable[Content]], **attrs: str) -> Markup:
    head = tag("tr", *(tag("th", h) for h in headers))
    body = join(tag("tr", *(tag("td", c) for c in row)) for row in rows)
    return tag("table", tag("thead", head), tag("tbody", body), **attrs)


def when(ts: Timestamp | None, now: dt.datetime) -> Markup:
    """A timestamp as 'YYYY-MM-DD HH:MM:SS UTC' with how long ago in its title; '-' unset."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return esc("-")
    at = ts.ToDatetime(tzinfo=dt.UTC)
    return tag("time", f"{at:%Y-%m-%d %H:%M:%S}", datetime=at.isoformat(), title=ago(at, now))


def ago(at: dt.datetime, now: dt.datetime) -> str:
    seconds = (now - at).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = f"{seconds:.0f} s"
    elif seconds < 5400:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 172_800:
        text = f"{seconds / 3600:.0f} h"
    else:
        text = f"{seconds / 86_400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


def labels(values: Mapping[str, str]) -> Markup:
    if not values:
        return esc("-")
    return join((tag("span", f"{k}={v}", class_="label") for k, v in sorted(values.items())), " ")


NAV = (("/fleet", "Fleet"), ("/rollouts", "Rollouts"), ("/alerts", "Alerts"))


def page(
    title: str,
    body: Content,
    csrf: str = "",
    active: str = "",
    error: str = "",
    notice: str = "",
) -> Markup:
    """A whole page: the navigation (with sign-out when signed in), a banner, the body."""
    nav = join(
        tag("a", label, href=href, class_="active" if href == active else None)
        for href, label in NAV
    )
    signout = (
        tag(
            "form",
            tag("input", type="hidden", name="_csrf", value=csrf),
            tag("button", "Sign out", type="submit"),
            method="post",
            action="/logout",
            class_="signout",
        )
        if csrf
        else Markup("")
    )
    header = tag("header", tag("strong", "AutoGLM fleet"), tag("nav", nav) if csrf else "", signout)
    banners = join(
        [
            tag("div", error, class_="banner error", role="alert") if error else "",
            tag("div", notice, class_="banner notice", role="status") if notice else "",
        ]
    )
    return Markup(
        "<!doctype html>"
        + tag(
            "html",
            tag(
                "head",
                tag("meta", charset="utf-8"),
                tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
                tag("title", f"{title} · AutoGLM fleet"),
                tag("link", rel="stylesheet", href="/static/console.css"),
                tag("script", "", src="/static/console.js", defer=True),
            ),
            tag("body", header, tag("main", tag("h1", title), banners, body)),
            lang="en",
        )
    )


def action_form(
    action: str, csrf: str, button: str, *fields: Markup, danger: bool = False
) -> Markup:
    """A POST form with the CSRF token."""
    return tag(
        "form",
        tag("input", type="hidden", name="_csrf", value=csrf),
        *fields,
        tag("button", button, type="submit", class_="danger" if danger else None),
        method="post",
        action=action,
        class_="action",
    )


def text_input(name: str, placeholder: str, required: bool = False, size: int = 24) -> Markup:
    return tag(
        "input",
        type="text",
        name=name,
        placeholder=placeholder,
        required=required,
        maxlength=500,
        size=size,
        aria_label=placeholder,
    )


def select(name: str, options: Iterable[tuple[str, str]], label: str, chosen: str = "") -> Markup:
    return tag(
        "select",
        *(tag("option", text, value=value, selected=value == chosen) for value, text in options),
        name=name,
        aria_label=label,
    )
