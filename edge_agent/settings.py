"""Loads typed settings once: a YAML file, environment overrides, then explicit overrides.

Contract module shared by the agent and the control plane. Unknown or mistyped keys are
errors that name the key and where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from edge_agent.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source over an already-parsed mapping (the YAML file)."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Reads a YAML file whose top level must be a mapping; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def load_settings(
    cls: type[SettingsT],
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SettingsT:
    """Builds `cls` from `path` (YAML), then the environment, then `overrides` (highest)."""
    file_data = read_yaml_mapping(path) if path is not None else {}
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}

    def sources(
        _cls: type[BaseSettings],
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _MappingSource(settings_cls, file_data))

    loaded_cls = type(cls.__name__, (cls,), {"settings_customise_sources": classmethod(sources)})
    try:
        return cast(SettingsT, loaded_cls(**explicit))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, file_data, explicit, cls)) from None


def _describe(
    exc: ValidationError,
    path: Path | None,
    file_data: Mapping[str, Any],
    explicit: Mapping[str, Any],
    cls: type[BaseSettings],
) -> str:
    """One line per problem, naming the key and where its value came from: the command line
    wins over the environment, which wins over the file (the order they are applied in)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    delimiter = str(cls.model_config.get("env_nested_delimiter") or "__")
    environ = {k.upper() for k in os.environ}
    problems = []
    for err in exc.errors():
        parts = [str(part) for part in err["loc"]]
        key = ".".join(parts)
        top = parts[0] if parts else ""
        names = [f"{prefix}{delimiter.join(parts[:n])}".upper() for n in range(len(parts), 0, -1)]
        from_env = next((n for n in names if prefix and n in environ), None)
        if top in explicit:
            origin = "command line"
        elif from_env is not None:
            origin = f"environment ({from_env})"
        elif path is not None and top in file_data:
            origin = str(path)
        elif prefix:
            origin = f"environment ({prefix}{top.upper()}) or command line"
        else:
            origin = "command line"
        if err["type"] == "extra_forbidden":
            problems.append(f"{origin}: unknown key '{key}'")
        else:
            problems.append(f"{origin}: key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(problems)


def check_listen(value: str, optional: bool) -> str:
    """A HOST:PORT to listen on (port 0: any free one); "" where `optional` (off)."""
    if value == "" and optional:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            "must be HOST:PORT with a port from 0 to 65535"
            + (", or empty (off)" if optional else "")
        )
    return value
