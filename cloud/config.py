"""Typed control-plane configuration: `<state-dir>/cloud.yaml`, AUTOGLM_CLOUD_* overrides, flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloud.console.peers import trusted_networks
from cloud.severity import SeverityRule
from edge_agent.errors import ConfigError
from edge_agent.settings import check_listen, load_settings

CONFIG_FILE = "cloud.yaml"


class CloudConfig(BaseSettings):
    """Everything `autoglm cloud serve` needs; written by `autoglm cloud init`."""

    model_config = SettingsConfigDict(env_prefix="AUTOGLM_CLOUD_", extra="forbid")

    state_dir: Path
    database_url: str = ""  # empty: SQLite in the state directory
    api_listen: str = "0.0.0.0:7443"  # TLS: enrollment and operator calls
    device_listen: str = "0.0.0.0:7444"  # mutual TLS: device calls
    # Plain-text grpc.health.v1 only, for Kubernetes gRPC probes (they speak no TLS); empty:
    # none. Nothing else is served on it.
    health_listen: str = ""
    # Plain-HTTP Prometheus /metrics (gRPC calls, sessions, records, the fleet's state read
    # from the store at each scrape); empty: none.
    metrics_listen: str = ""
    # The web console (plain HTTP: for localhost, or behind a proxy that terminates TLS): it
    # calls the operator API with each signed-in operator's own token; empty: none.
    console_listen: str = ""
    # Proxies in front of the console (addresses or networks, e.g. 10.0.0.5 or 10.1.0.0/16):
    # for requests from them the client is the rightmost X-Forwarded-For address that is not
    # one of them, so wrong sign-ins lock out that client, not everyone behind the proxy.
    console_trusted_proxies: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=lambda: ["localhost"])  # names in the server cert
    advertise_host: str = ""  # host agents and operators dial; empty: hosts[0]
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    offline_after_s: float = Field(default=30.0, gt=0)
    presence_flush_interval_s: float = Field(default=1.0, gt=0)
    # Agent sessions being set up at once; more are refused (RESOURCE_EXHAUSTED) with a hint
    # of when to come back, so a fleet reconnecting after a restart does not queue past its
    # hello timeout (tests/benchmarks/bench_heartbeats.py --storm).
    max_session_setups: int = Field(default=64, ge=1)
    auth_recheck_interval_s: float = Field(default=5.0, gt=0)
    # How often each replica reads the desired-state changes made through any replica (the
    # bound on how late a device on another replica than the change gets its desired state).
    desired_poll_interval_s: float = Field(default=1.0, gt=0)
    enrollment_token_ttl_s: int = Field(default=86_400, gt=0)
    device_cert_validity_days: float = Field(default=365, gt=0)
    # After a device renews its certificate, the old one stays accepted (sessions open with
    # it, a renewal whose answer was lost) until the device first uses the new one, at most
    # until it expires; this long for devices enrolled before expiry was recorded.
    device_cert_grace_s: float = Field(default=7 * 86_400.0, ge=0)
    # Audit log entries older than this are deleted (by the leader, hourly); 0 keeps all.
    audit_retention_days: float = Field(default=400.0, ge=0)
    artifacts_dir: Path | None = None  # content-addressed bundle files; empty: STATE_DIR/artifacts
    max_bundle_bytes: int = Field(default=4 << 30, gt=0)
    rollout_interval_s: float = Field(default=2.0, gt=0)  # reconciliation loop period
    install_timeout_s: float = Field(default=900.0, gt=0)  # no install report: target failed
    shadow_grace_s: float = Field(default=600.0, ge=0)  # wait for shadow windows after the soak
    webhook_max_attempts: int = Field(default=8, ge=1)  # then the delivery is dead
    webhook_retry_initial_s: float = Field(default=1.0, gt=0)  # doubles per attempt
    webhook_retry_max_s: float = Field(default=300.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_poll_s: float = Field(default=1.0, gt=0)  # picks up other replicas' deliveries
    # Alertmanager targets: an open alert is sent with endsAt this far ahead and sent again
    # every third of it, so Alertmanager resolves it by itself if the control plane is gone.
    alertmanager_hold_s: float = Field(default=900.0, ge=30)
    alert_severity: list[SeverityRule] = Field(default_factory=list)  # first match wins
    max_shelve_s: float = Field(default=7 * 86_400.0, gt=0)  # the longest an alert is shelved
    # Device profiles (firmware_images/profiles/*.yaml); `device register --profile` must name
    # one. Empty: the checkout's firmware_images/profiles when present, else no check.
    profiles_dir: Path | None = None
    # Several replicas: only the leader runs the rollout controller. auto: a Kubernetes Lease
    # inside a cluster, else a lease row in the store when it is PostgreSQL, else off.
    leader_election: Literal["auto", "off", "database", "kubernetes"] = "auto"
    leader_lease_s: float = Field(default=15.0, gt=0)
    replica_id: str = ""  # empty: $POD_NAME, else host-pid
    # Processes serving the same API and device ports on this host (cloud/service/workers.py),
    # each a replica of its own (its id: replica_id + "-w<k>"); more than one needs PostgreSQL.
    workers: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with ids

    @field_validator(
        "api_listen", "device_listen", "health_listen", "metrics_listen", "console_listen"
    )
    @classmethod
    def _host_port(cls, value: str, info: ValidationInfo) -> str:
        # No probe, metrics or console port when empty; the API and device ports are required.
        return check_listen(value, optional=info.field_name not in ("api_listen", "device_listen"))

    @field_validator("console_trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        trusted_networks(value)
        return value

    @field_validator("hosts")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not h.strip() for h in value):
            raise ValueError("needs at least one non-empty host name or IP address")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'autoglm.db'}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return self.artifacts_dir or self.state_dir / "artifacts"

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.hosts[0]


def load_cloud_config(state_dir: Path, overrides: dict[str, Any] | None = None) -> CloudConfig:
    """Loads `<state_dir>/cloud.yaml` with environment and flag overrides on top."""
    path = state_dir / CONFIG_FILE
    if not path.exists():
        raise ConfigError(
            f"{state_dir}: not an initialised control-plane state directory "
            f"(no {CONFIG_FILE}); run `autoglm cloud init --state-dir {state_dir}` first"
        )
    values = {"state_dir": state_dir, **(overrides or {})}
    return load_settings(CloudConfig, path, values)
