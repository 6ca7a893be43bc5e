"""The `--schema` YAML of `model train`: `sensors: [{name: ..., unit: ...}, ...]`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from edge_agent.errors import ConfigError
from edge_agent.settings import read_yaml_mapping


class _SensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    unit: str = ""


class _SchemaFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sensors: list[_SensorEntry]


def read_schema_file(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sensor names and units, in order; errors name the file and the field."""
    try:
        parsed = _SchemaFile.model_validate(read_yaml_mapping(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {field}: {first['msg']}") from None
    if not parsed.sensors:
        raise ConfigError(f"{path}: sensors: empty list")
    return tuple(s.name for s in parsed.sensors), tuple(s.unit for s in parsed.sensors)
