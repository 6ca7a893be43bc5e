"""Time-series charts drawn on the server as inline SVG: no chart library, nothing fetched."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloud.console.markup import Markup, esc, join, tag

PALETTE = ("#1f6feb", "#d9480f", "#2f9e44", "#9c36b5", "#e67700", "#0b7285")
LEFT, RIGHT, TOP, BOTTOM = 48, 40, 14, 30


@dataclass(frozen=True)
class Series:
    """One line: (seconds since the epoch, value) points in time order."""

    name: str
    points: Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Span:
    """A shaded time range (an alert from first seen to resolved)."""

    start: float
    end: float
    label: str


def line_chart(
    title: str,
    series: Sequence[Series],
    threshold: float | None = None,
    span: Span | None = None,
    width: int = 760,
    height: int = 240,
) -> Markup:
    """An SVG chart of `series` on a shared time axis; a dashed line at `threshold`."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return tag("p", f"{title}: no data in this range", class_="empty")
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x0, x1 = min(xs), max(xs)
    if span is not None:
        x0, x1 = min(x0, span.start), max(x1, span.end)
    if x1 - x0 < 1:
        x0, x1 = x0 - 30, x1 + 30
    y0 = min(0.0, min(ys))
    y1 = max(ys + ([threshold * 1.15] if threshold is not None else []))
    if y1 - y0 < 1e-9:
        y1 = y0 + 1.0
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts: list[Markup] = [
        tag("title", title),
        tag("rect", x=LEFT, y=TOP, width=plot_w, height=plot_h, fill="#fff", stroke="#ccc"),
    ]
    if span is not None:
        left, right = px(span.start), px(max(span.end, span.start))
        parts.append(
            tag(
                "rect",
                tag("title", span.label),
                x=f"{left:.1f}",
                y=TOP,
                width=f"{max(right - left, 3):.1f}",
                height=plot_h,
                fill="#ffc9c9",
                fill_opacity=0.6,
                class_="span",
            )
        )
    parts += _y_axis(y0, y1, py)
    parts += _x_axis(x0, x1, px, height)
    if threshold is not None and y0 <= threshold <= y1:
        parts.append(
            tag(
                "line",
                tag("title", f"threshold {threshold:g}"),
                x1=LEFT,
                x2=LEFT + plot_w,
                y1=f"{py(threshold):.1f}",
                y2=f"{py(threshold):.1f}",
                stroke="#c92a2a",
                stroke_dasharray="5 4",
                class_="threshold",
            )
        )
    legend: list[Markup] = []
    for i, s in enumerate(drawn):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        parts.append(
            tag(
                "polyline",
                tag("title", s.name),
                points=points,
                fill="none",
                stroke=colour,
                stroke_width=2 if len(s.points) > 1 else 6,
                stroke_linecap="round",
                class_="series",
                data_series=s.name,
                data_points=len(s.points),
            )
        )
        legend.append(tag("span", tag("i", "", class_=f"swatch c{i % len(PALETTE)}"), s.name))
    svg = tag(
        "svg",
        *parts,
        xmlns="http://www.w3.org/2000/svg",
        viewBox=f"0 0 {width} {height}",
        width=width,
        height=height,
        role="img",
        aria_label=title,
        class_="chart",
    )
    return tag("figure", svg, tag("figcaption", esc(title), " ", join(legend, " ")))


def _y_axis(y0: float, y1: float, py: Callable[[float], float]) -> list[Markup]:
    out = []
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        y = py(value)
        out.append(tag("line", x1=LEFT - 4, x2=LEFT, y1=f"{y:.1f}", y2=f"{y:.1f}", stroke="#888"))
        out.append(
            tag(
                "text",
                f"{value:.2f}",
                x=LEFT - 6,
                y=f"{y + 4:.1f}",
                text_anchor="end",
                font_size=11,
                fill="#555",
            )
        )
    return out


def _x_axis(x0: float, x1: float, px: Callable[[float], float], height: int) -> list[Markup]:
    fmt = "%H:%M:%S" if x1 - x0 < 6 * 3600 else "%m-%d %H:%M"
    out = []
    for i in range(5):
        value = x0 + (x1 - x0) * i / 4
        x = px(value)
        try:
            label = dt.datetime.fromtimestamp(value, dt.UTC).strftime(fmt)
        except (OverflowError, ValueError, OSError):  # padded past the calendar's ends
            label = ""
        out.append(
            tag(
                "line",
                x1=f"{x:.1f}",
                x2=f"{x:.1f}",
                y1=height - BOTTOM,
                y2=height - BOTTOM + 4,
                stroke="#888",
            )
        )
        out.append(
            tag(
                "text",
                label,
                x=f"{x:.1f}",
                y=height - BOTTOM + 16,
                text_anchor="middle",
                font_size=11,
                fill="#555",
            )
        )
    return out
