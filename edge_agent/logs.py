"""Log output for the agent and the control plane: text for people, or one JSON object per
line for a log pipeline (Loki, Elasticsearch), carrying the ids a line is about.

A call names them with `extra=ids(asset=..., alert=...)`; the process's own ids (`device` on
an agent, `replica` in the control plane) are on every line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from edge_agent.errors import ConfigError

FORMATS = ("text", "json")
ID_FIELDS = ("device", "asset", "rollout", "alert", "replica", "model_version")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def ids(**values: str) -> dict[str, str]:
    """`extra=` for a log call: the ids the line is about (see ID_FIELDS)."""
    unknown = set(values) - set(ID_FIELDS)
    if unknown:
        raise ValueError(f"log ids: unknown {sorted(unknown)}")
    return {k: v for k, v in values.items() if v}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, str]) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for field in ID_FIELDS:
            value = record.__dict__.get(field)
            if value:
                doc[field] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = "text", **static: str) -> None:
    """Configures the root logger once per process (the CLI's `run` and `serve`)."""
    number = getattr(logging, level.upper(), None)
    if not isinstance(number, int):
        raise ConfigError(f"log level '{level}' is not DEBUG, INFO, WARNING or ERROR")
    if fmt not in FORMATS:
        raise ConfigError(f"log format '{fmt}' is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter({k: v for k, v in static.items() if v}))
    else:
        handler.setFormatter(logging.Formatter(_TEXT))
    # Not forced: where the root logger has handlers already (an embedding program, pytest)
    # they stay, as `basicConfig` always did here.
    logging.basicConfig(level=number, handlers=[handler])
