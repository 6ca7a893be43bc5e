"""`autoglm-edge check`: what would stop this agent from working, found before it runs (like
`iotedge check`): its configuration, state directory and disk, its identity and clock, the
site broker, the control plane and the model it would serve. Each check says what it found
and, when it fails, what to do."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.errors import AutoglmError

PASS, WARN, FAIL = "ok", "warning", "failed"
LOW_DISK_BYTES = 1 << 30
CERT_WARN_DAYS = 30
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str  # ok | warning | failed
    detail: str


def run_checks(
    config_path: Path | None, overrides: dict[str, object], timeout_s: float = TIMEOUT_S
) -> list[Check]:
    """Every check that can run; a failed configuration stops the rest (they need it)."""
    try:
        config = load_agent_config(config_path, overrides)
    except AutoglmError as exc:
        return [Check("config", FAIL, str(exc))]
    where = str(config_path) if config_path else "defaults and AUTOGLM_EDGE_* variables"
    checks = [Check("config", PASS, f"{where}: {len(config.assets)} asset(s)")]
    for name, probe in (
        ("state dir", lambda: _state_dir(config)),
        ("identity", lambda: _identity(config)),
        ("broker", lambda: _broker(config, timeout_s)),
        ("control plane", lambda: _control_plane(config, timeout_s)),
        ("model", lambda: _model(config)),
    ):
        checks.append(_guarded(name, probe))
    return checks


def _guarded(name: str, probe: Callable[[], tuple[str, str]]) -> Check:
    try:
        outcome, detail = probe()
    except AutoglmError as exc:
        return Check(name, FAIL, str(exc))
    except Exception as exc:  # noqa: BLE001 - a check reports, it never crashes the command
        return Check(name, FAIL, f"{type(exc).__name__}: {exc}")
    return Check(name, outcome, detail)


def _state_dir(config: AgentConfig) -> tuple[str, str]:
    directory = config.state_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".check-"):
            pass
    except OSError as exc:
        return FAIL, f"{directory} is not writable: {exc.strerror}"
    free = shutil.disk_usage(directory).free
    if free < LOW_DISK_BYTES:
        return WARN, (
            f"{directory}: only {free / 2**20:.0f} MiB free; the outbox and models need room "
            "(a full disk keeps alerting on site but loses predictions)"
        )
    return PASS, f"{directory}: writable, {free / 2**30:.1f} GiB free"


def _identity(config: AgentConfig) -> tuple[str, str]:
    from cryptography import x509

    from edge_agent.identity import load_identity

    identity = load_identity(config.state_dir)
    now = dt.datetime.now(dt.UTC)
    clock = identity.clock_problem(now)
    if clock:
        return FAIL, clock
    leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    left = leaf.not_valid_after_utc - now
    who = f"{identity.info.device_name} ({identity.info.device_id})"
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return WARN, (
            f"{who}: the certificate expires in {left.days} day(s) "
            f"({leaf.not_valid_after_utc:%Y-%m-%d}); re-enroll with a new token "
            "(autoglm device token)"
        )
    return PASS, f"{who}; certificate valid until {leaf.not_valid_after_utc:%Y-%m-%d}"


def _broker(config: AgentConfig, timeout_s: float) -> tuple[str, str]:
    from edge_agent.ingest.mqtt import MqttConnection

    # Its own client id, and no session kept: the agent's persistent session is left alone.
    link = config.mqtt.model_copy(update={"session_expiry_s": 0})
    connection = MqttConnection(
        link, f"autoglm-edge-check-{threading.get_ident()}", [], lambda *_: None, lambda _: None
    )
    where = f"{link.host}:{link.port}"
    connection.start()
    try:
        if connection.connected.wait(timeout_s):
            return PASS, f"{where}: connected (MQTT {link.protocol})"
        error = connection.stats.last_error or "no answer"
        return FAIL, (
            f"{where}: not connected within {timeout_s:.0f} s ({error}); check mqtt.host, "
            "mqtt.port, credentials and TLS in the config, and that the broker runs"
        )
    finally:
        connection.stop()


def _control_plane(config: AgentConfig, timeout_s: float) -> tuple[str, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge_agent.enroll import channel_options
    from edge_agent.errors import from_rpc_error
    from edge_agent.identity import load_identity

    try:
        identity = load_identity(config.state_dir)
    except AutoglmError:
        return FAIL, "not checked: it needs this device's identity (see identity)"
    address = config.cloud.device_address or identity.info.device_address
    name = config.cloud.tls_server_name or identity.info.tls_server_name
    with grpc.secure_channel(address, identity.credentials(), channel_options(name)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, address)
            clock = identity.clock_problem(dt.datetime.now(dt.UTC))
            return FAIL, f"{clock} ({error})" if clock else str(error)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return FAIL, f"{address}: mutual TLS works, but the control plane says {status}"
    return PASS, f"{address}: mutual TLS, serving"


def _model(config: AgentConfig) -> tuple[str, str]:
    from edge_agent.bundle import load_public_key, verify_bundle
    from edge_agent.identity import load_identity
    from edge_agent.trust import DeviceTrust

    active = config.state_dir / "models" / "active.json"
    bundle = config.model.bundle
    if bundle is None:
        if active.exists():
            return PASS, f"no configured bundle; serves the installed slot ({active})"
        return WARN, (
            "no model: the agent ingests nothing until a rollout installs one (or set model.bundle)"
        )
    pinned = load_public_key(load_identity(config.state_dir).signing_public_pem, "pinned key")
    key = DeviceTrust(config.state_dir, pinned)
    if bundle.is_file():
        return PASS, f"{bundle}: a bundle archive (verified when the agent unpacks it)"
    manifest = verify_bundle(bundle, key)
    return PASS, f"{bundle}: {manifest.name}:{manifest.version}, signature and files verify"
