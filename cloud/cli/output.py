"""Printing for the CLI: aligned tables, JSON, relative times."""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out.write(line.format(*headers).rstrip() + "\n")
    for row in rows:
        out.write(line.format(*row).rstrip() + "\n")


FORMATS = ("table", "json", "yaml")
_structured = "json"  # what print_json writes: json, or yaml under `-o yaml`


def set_structured_format(name: str) -> None:
    global _structured
    _structured = name


def print_json(data: Any, out: TextIO | None = None) -> None:
    """The structured output of a command: JSON (`--json`, `-o json`) or YAML (`-o yaml`)."""
    out = out or sys.stdout
    if _structured == "yaml":
        import yaml  # only for -o yaml

        plain = json.loads(json.dumps(data, default=str))
        out.write(yaml.safe_dump(plain, sort_keys=True, allow_unicode=True))
        return
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def ago(when: dt.datetime | None, now: dt.datetime) -> str:
    """'12s ago', '3m ago', 'never'."""
    if when is None:
        return "never"
    seconds = max(0, int((now - when).total_seconds()))
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


# The longest duration a flag takes: the API carries durations as uint32 seconds, and a time
# this far from now still fits a datetime (about 136 years; datetime ends at year 9999).
MAX_DURATION_S = 2**32 - 1


class DurationTooLong(ValueError):
    """A well-formed duration past the longest one allowed."""


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '24h', '7d' as seconds, at most MAX_DURATION_S; ValueError with the
    reason otherwise."""
    units = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"'{text}' is not a duration like 90s, 15m, 24h or 7d") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"duration '{text}' must be a positive number")
    seconds = value * units[unit]
    if seconds > MAX_DURATION_S:
        raise DurationTooLong(
            f"duration '{text}' is too long: at most {MAX_DURATION_S} s "
            f"({MAX_DURATION_S // 86_400}d)"
        )
    return seconds


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label '{item}' is not of the form key=value")
        labels[key] = value
    return labels


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def json_view(message: Message) -> dict[str, Any]:
    """A message as `--json` prints it: field names as in the .proto, enums as the words the
    tables show (`STATE_FIRING` -> `firing`), 64-bit integers as numbers (protobuf's JSON
    mapping makes them strings)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _plain(message.DESCRIPTOR, data)


def _plain(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            data[key] = {k: _value(inner, v) for k, v in value.items()}
        elif isinstance(value, list):
            data[key] = [_value(field, v) for v in value]
        else:
            data[key] = _value(field, value)
    return data


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM and isinstance(value, str):
        assert field.enum_type is not None
        prefix = field.enum_type.values[0].name.split("_", 1)[0] + "_"
        return value.removeprefix(prefix).lower()
    if field.type in _INT64 and isinstance(value, str):
        return int(value)
    if field.type == FieldDescriptor.TYPE_MESSAGE and isinstance(value, dict):
        return _plain(field.message_type, value)
    return value


def print_token_json(bootstrap_out: Path | None, data: dict[str, Any], token: str) -> None:
    """`data` with where an enrollment token went: the bootstrap file written, else the
    token itself (shown once)."""
    if bootstrap_out:
        data["bootstrap_file"] = str(bootstrap_out)
    else:
        data["enrollment_token"] = token
    print_json(data)
