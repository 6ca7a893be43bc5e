"""The raw sensor window a device captured when it raised an alert, charted for the alert's
page: its top sensors over the window, in calibration deviations so they share one axis."""

from __future__ import annotations

import datetime as dt

import numpy as np

from cloud.captures import CaptureRecord
from cloud.console.api import OperatorCalls
from cloud.console.charts import Series, line_chart
from cloud.console.context import moved
from cloud.console.markup import Markup, tag
from cloud.service.records import capture_from_proto
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

LOOK_BACK = dt.timedelta(hours=1)  # a window that raised ends before the alert's first seen
LOOK_AHEAD = dt.timedelta(minutes=10)
MAX_SCANNED = 2000  # windows read at most looking for the alert's
TOP_SENSORS = 5


async def alert_window(calls: OperatorCalls, alert: operator_pb2.Alert) -> CaptureRecord | None:
    """The first window captured for the raise that opened `alert`; None when the device
    captured none (capture off, or not synced yet)."""
    first = alert.first_seen.ToDatetime(tzinfo=dt.UTC)
    request = operator_pb2.ListCapturesRequest(device=alert.device_id, page_size=200)
    request.since.FromDatetime(moved(first, -LOOK_BACK))
    scanned = 0
    async for window in calls.captures(request):
        scanned += 1
        if window.alert_id == alert.id:
            try:
                return capture_from_proto(window.device_id, window.sequence, window.capture, "")
            except InvalidInput:
                return None  # stored before today's checks; nothing to draw
        start = window.capture.window_start.ToDatetime(tzinfo=dt.UTC)
        if start > moved(first, LOOK_AHEAD) or scanned >= MAX_SCANNED:
            break
    return None


def window_chart(alert: operator_pb2.Alert, window: CaptureRecord | None) -> Markup:
    """The top sensors' readings over the captured window; a line saying why not, else."""
    if window is None:
        return tag(
            "p",
            "No captured window for this alert (capture off on the device, or not synced yet).",
            class_="empty",
        )
    values, _ = window.arrays()
    start = window.window_start.timestamp()
    wanted = [s.sensor for s in alert.top_sensors[:TOP_SENSORS] if s.sensor in window.sensors]
    series = []
    for sensor in wanted or list(window.sensors[:TOP_SENSORS]):
        j = window.sensors.index(sensor)
        center, scale = window.input_center[j], window.input_scale[j]
        points = [
            (start + k * window.period_s, float((values[k, j] - center) / scale))
            for k in range(window.length)
            if np.isfinite(values[k, j])
        ]
        series.append(Series(sensor, points))
    return line_chart(
        f"Captured window that raised it ({window.length} rows every {window.period_s:g} s, "
        f"score {window.score:.2f}): top sensors in calibration deviations",
        series,
    )
