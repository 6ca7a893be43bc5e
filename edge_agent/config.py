"""Typed agent configuration (agent.yaml), with AUTOGLM_EDGE_* environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.retry import Backoff
from edge_agent.settings import load_settings


class CloudLink(BaseModel):
    """How the agent reaches the control plane; empty fields come from the enrolled identity."""

    model_config = ConfigDict(extra="forbid")

    device_address: str = ""
    tls_server_name: str = ""
    heartbeat_interval_s: float = Field(default=0.0, ge=0)  # 0: what the control plane asks for


class ReconnectPolicy(BaseModel):
    """Jittered exponential backoff between session attempts."""

    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=60.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectPolicy:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be at least initial_s")
        return self

    def backoff(self) -> Backoff:
        return Backoff(self.initial_s, self.max_s, self.multiplier, self.jitter)


class AgentConfig(BaseSettings):
    """The agent's settings; see docs in edge_agent/agent.example.yaml."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOGLM_EDGE_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path
    cloud: CloudLink = Field(default_factory=CloudLink)
    reconnect: ReconnectPolicy = Field(default_factory=ReconnectPolicy)
    log_level: str = "INFO"


def load_agent_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    return load_settings(AgentConfig, path, overrides)
