"""A synced prediction straight from the wire into the store's row (`cloud.domain.PredictionRow`).

Predictions are nearly all of what devices sync, so this path does per record only what it
must: the bounds `cloud.service.bounds` enforces, checked field by field, and the row's plain
values. The contributions' JSON text comes from a format string cached per set of sensor
names (a device sends the same sensors in every prediction). A record this does not take
(another kind, a field out of bounds) goes the general way, which words the refusal.
"""

from __future__ import annotations

import json
import math

from cloud.domain import PredictionRow
from cloud.service.bounds import MAX_SECONDS, MIN_SECONDS, REPEATED_LIMITS, STRING_LIMITS
from protos.autoglm.v1 import agent_pb2

_ASSET = STRING_LIMITS["autoglm.v1.Prediction.asset"]
_VERSION = STRING_LIMITS["autoglm.v1.Prediction.model_version"]
_SENSOR = STRING_LIMITS["autoglm.v1.Prediction.ContributionsEntry.key"]
_SENSORS = REPEATED_LIMITS["autoglm.v1.Prediction.contributions"]
_TEMPLATES_KEPT = 1024
_templates: dict[tuple[str, ...], str | None] = {}
_isfinite = math.isfinite


def _template(names: tuple[str, ...]) -> str | None:
    """'{"a": %r, "b": %r}' for these sensor names (None: a name out of bounds)."""
    if len(names) > _SENSORS or any(len(n) > _SENSOR or "\x00" in n for n in names):
        return None
    if len(_templates) >= _TEMPLATES_KEPT:
        _templates.clear()
    # json.dumps writes a float as repr() does; the names are escaped as JSON strings.
    fields = ", ".join(json.dumps(n).replace("%", "%%") + ": %r" for n in names)
    return "{" + fields + "}"


def prediction_row(device_id: str, record: agent_pb2.Record) -> PredictionRow | None:
    """The store row of a prediction within its bounds; None for anything else. The
    sequence number is checked by the caller."""
    if record.WhichOneof("body") != "prediction":
        return None
    p = record.prediction
    asset, version, score = p.asset, p.model_version, p.score
    if (
        len(asset) > _ASSET
        or len(version) > _VERSION
        or "\x00" in asset
        or "\x00" in version
        or not _isfinite(score)
    ):
        return None
    start, end = p.window_start, p.window_end
    start_s, start_ns, end_s, end_ns = start.seconds, start.nanos, end.seconds, end.nanos
    if not (
        MIN_SECONDS <= start_s <= MAX_SECONDS
        and MIN_SECONDS <= end_s <= MAX_SECONDS
        and 0 <= start_ns <= 999_999_999
        and 0 <= end_ns <= 999_999_999
    ):
        return None
    contributions = p.contributions
    names = tuple(contributions)
    template = _templates.get(names, "")
    if template == "":
        template = _templates[names] = _template(names)
    if template is None:
        return None
    values = tuple(map(contributions.__getitem__, names))
    if not all(map(_isfinite, values)):
        return None
    return (
        device_id,
        record.sequence,
        asset,
        start_s,
        start_ns // 1000,
        end_s,
        end_ns // 1000,
        score,
        p.anomalous,
        version,
        template % values,
    )
