"""Typed agent configuration (agent.yaml), with AUTOGLM_EDGE_* environment overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.retry import Backoff
from edge_agent.settings import check_listen, load_settings


class CloudLink(BaseModel):
    """How the agent reaches the control plane; empty fields come from the enrolled identity."""

    model_config = ConfigDict(extra="forbid")

    device_address: str = ""
    tls_server_name: str = ""
    heartbeat_interval_s: float = Field(default=0.0, ge=0)  # 0: what the control plane asks for
    # A revoked device (or one whose certificate is no longer current) stops, exit code 6 or
    # 5, instead of retrying forever; false: it keeps alerting on site and keeps retrying.
    stop_when_refused: bool = True
    # Nothing heard from the control plane this long (a probe goes out at half of it) ends
    # the session and reconnects: a partition that silently drops packets is noticed.
    dead_after_s: float = Field(default=15.0, ge=2)
    # Connecting, the TLS handshake and the control plane's answer to the hello together;
    # longer than dead_after_s so that a fleet reconnecting at once is not abandoning the
    # handshakes the control plane has queued (and queueing them again).
    setup_timeout_s: float = Field(default=60.0, ge=2)
    # The certificate is renewed this far through its life (then retried with the reconnect
    # backoff while the control plane cannot be reached); checked every renew_check_s.
    renew_at: float = Field(default=0.67, gt=0, lt=1)
    renew_check_s: float = Field(default=3600.0, gt=0)


class ReconnectPolicy(BaseModel):
    """Jittered exponential backoff between session attempts.

    Full jitter by default (each delay drawn from [initial_s, step]): a fleet that lost its control
    plane at one moment comes back spread out, not in synchronised waves (measured by
    `tests/benchmarks/bench_heartbeats.py --storm`). The ceiling is twice the old 60 s so
    the mean delay at the cap stays 60 s."""

    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(default=1.0, gt=0)
    max_s: float = Field(default=120.0, gt=0)
    multiplier: float = Field(default=2.0, ge=1)
    full_jitter: bool = True
    jitter: float = Field(default=0.2, ge=0, lt=1)  # used when full_jitter is off

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectPolicy:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be at least initial_s")
        return self

    def backoff(self) -> Backoff:
        return Backoff(
            self.initial_s, self.max_s, self.multiplier, self.jitter, full_jitter=self.full_jitter
        )


class MqttTls(BaseModel):
    """TLS to the site broker; empty files mean the system's CA store / no client certificate."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttLink(BaseModel):
    """The site broker the sensors publish to and the agent publishes alerts on."""

    model_config = ConfigDict(extra="forbid")

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    # "5", or "3.1.1" for brokers that speak only that (the persistent session is then a
    # clean_session=False session; the broker decides how long it keeps it).
    protocol: Literal["5", "3.1.1"] = "5"
    # Stable across restarts: the broker keeps the persistent session under this id.
    # Empty: "autoglm-edge-<device name>".
    client_id: str = ""
    username: str = ""
    password: str = ""
    tls: MqttTls | None = None
    keepalive_s: int = Field(default=30, ge=5)
    # How long the broker keeps our subscriptions and queued QoS 1 messages while we are away.
    session_expiry_s: int = Field(default=86_400, ge=0)
    qos: Literal[0, 1] = 1
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    # Alerts go to <alert_prefix>/alerts/<device>/<asset>; the retained state to
    # <alert_prefix>/state/<device>/<asset>; both payloads name the device too.
    alert_prefix: str = "autoglm"

    @field_validator("alert_prefix")
    @classmethod
    def _publishable(cls, value: str) -> str:
        check_topic_name(value)
        return value


ASSET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # also the plane's bound on drift series


_SPARKPLUG_ID = re.compile(r"^[^/+#]{1,128}$")


class SparkplugId(BaseModel):
    """An edge node (and device) in the Sparkplug B topic namespace."""

    model_config = ConfigDict(extra="forbid")

    group: str
    edge_node: str

    @field_validator("group", "edge_node")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _SPARKPLUG_ID.match(value):
            raise ValueError(f"{value!r}: 1-128 characters, none of / + #")
        return value


class SparkplugSource(SparkplugId):
    """Where an asset's metrics come from: a device of an edge node, or the node itself."""

    device: str = ""  # "": the node's own metrics (NBIRTH/NDATA)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return value and cls._id(value)


class ModbusRegister(BaseModel):
    """One sensor in a Modbus device's register map."""

    model_config = ConfigDict(extra="forbid")

    sensor: str  # as the model's schema (or `sensors`) names it
    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=65535)  # 0-based, as on the wire
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = "big"  # of 32-bit values: high word first or last
    scale: float = 1.0  # value = raw * scale + offset
    offset: float = 0.0

    @model_validator(mode="after")
    def _fits(self) -> ModbusRegister:
        if self.address + (2 if self.type.endswith("32") else 1) > 65536:
            raise ValueError(
                f"register {self.sensor!r}: {self.type} at {self.address} runs past 65535"
            )
        return self


class ModbusSource(BaseModel):
    """A Modbus TCP device polled for an asset's sensors."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    device_id: int = Field(default=1, ge=0, le=255)  # the unit id
    period_s: float = Field(default=1.0, ge=0.01)  # poll period; readings are stamped at the poll
    timeout_s: float = Field(default=2.0, gt=0)
    registers: list[ModbusRegister] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_sensors(self) -> ModbusSource:
        names = [r.sensor for r in self.registers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"modbus registers: sensors mapped twice: {repeated}")
        return self


_NODE_ID = re.compile(r"^(ns=\d{1,5};)?[sigb]=.{1,512}$", re.S)


class OpcUaNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sensor: str
    node_id: str  # ns=2;s=Pump1.Flow, ns=3;i=1002, i=2258

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if not _NODE_ID.match(value):
            raise ValueError(f"{value!r} is not an OPC UA node id (ns=2;s=Pump1.Flow, i=2258)")
        return value


class OpcUaSource(BaseModel):
    """An OPC UA server whose nodes are an asset's sensors (data-change subscription)."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(pattern=r"^opc\.tcp://[^\s]+$")
    security: Literal["None", "Basic256Sha256"] = "None"  # None: labs only
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path | None = None  # the agent's application certificate (DER or PEM)
    private_key: Path | None = None
    server_certificate: Path | None = None  # pinned; empty: the one the endpoint offers
    application_uri: str = "urn:autoglm:edge-agent"  # as in the certificate's SAN
    username: str = ""
    password: str = ""
    publishing_interval_ms: float = Field(default=500.0, ge=10)
    queue_size: int = Field(default=100, ge=0, le=100_000)  # values kept between publishes
    timeout_s: float = Field(default=4.0, gt=0)
    nodes: list[OpcUaNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _secured(self) -> OpcUaSource:
        if self.security != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security {self.security} needs certificate and private_key")
        return self


class OpcUaOut(BaseModel):
    """The agent's OPC UA alert server for HMIs (`edge_agent/opcua_out.py`)."""

    model_config = ConfigDict(extra="forbid")

    listen: str = "0.0.0.0:4841"
    certificate: Path | None = None  # with private_key: Basic256Sha256 SignAndEncrypt only
    private_key: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value, optional=False)

    @model_validator(mode="after")
    def _pair(self) -> OpcUaOut:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together (or neither: no security)")
        return self


class AssetConfig(BaseModel):
    """One machine: the topics its sensors publish on (JSON) or the Sparkplug B device it is,
    and how names on the wire map to the model's sensors."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # MQTT subscriptions (wildcards allowed). A single reading's sensor is the topic's last
    # level; batches name their sensors or use the topic's last level too.
    topics: list[str] = Field(default_factory=list)
    # Sparkplug B: the device (or edge node) whose metrics are this asset's sensors.
    sparkplug: SparkplugSource | None = None
    # Modbus TCP: a device whose registers are polled for this asset's sensors.
    modbus: ModbusSource | None = None
    # OPC UA: a server whose nodes are this asset's sensors.
    opcua: OpcUaSource | None = None
    # Renames: name used on the wire (a topic level, a field, a Sparkplug metric name) ->
    # sensor name in the model's schema.
    sensors: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _a_source(self) -> AssetConfig:
        if not self.topics and self.sparkplug is None and self.modbus is None and not self.opcua:
            raise ValueError(
                f"asset {self.name!r} needs topics, sparkplug, modbus or opcua (where its data is)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not ASSET_NAME.fullmatch(value):
            raise ValueError(f"asset name {value!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, value: list[str]) -> list[str]:
        for topic in value:
            check_topic_filter(topic)
        return value


def check_topic_filter(topic: str) -> None:
    """MQTT's rules for a subscription (v5 section 4.7): a broker refuses anything else, and a
    refused subscription used to end ingest with a traceback while the agent looked online."""
    if not topic:
        raise ValueError("topic filter is empty")
    if "\x00" in topic or len(topic.encode()) > 65_535:
        raise ValueError(f"topic filter {topic!r}: no NUL characters, at most 65535 bytes")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic!r}: '#' must be a whole level, the last one")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic!r}: '+' must be a whole level")


def check_topic_name(topic: str) -> None:
    """A topic to publish on: a filter without wildcards."""
    check_topic_filter(topic)
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r}: no wildcards ('+', '#') in a topic to publish on")


class IngestLimits(BaseModel):
    """What the decoder accepts; everything else is dropped and counted by reason."""

    model_config = ConfigDict(extra="forbid")

    max_payload_bytes: int = Field(default=1 << 20, ge=64)
    max_future_s: float = Field(default=300.0, ge=0)
    max_past_s: float = Field(default=7 * 86_400.0, gt=0)
    # A grid slot closes this long after the newest reading passed it; readings older than a
    # closed slot are "late". 0: two sampling periods.
    max_lateness_s: float = Field(default=0.0, ge=0)
    # ... or as soon as every sensor of the asset has a reading at or after it (real-time
    # alerts); off: always wait the lateness, for sources that often deliver out of order.
    close_complete_slots: bool = True
    # Readings one asset may have waiting for the pipeline; past it its source waits (MQTT
    # QoS 1: the broker keeps the rest), at most backlog_block_s, then drops and counts
    # (`backlog_full`). Other assets are drained in turn meanwhile (edge_agent/ingest/fair_queue).
    max_backlog_readings: int = Field(default=20_000, ge=100)
    backlog_block_s: float = Field(default=5.0, ge=0)
    # MQTT messages (JSON topics, Sparkplug data) one asset may send a second on average, in
    # bursts of up to message_burst_s seconds of them; past it they are dropped before their
    # readings are decoded (a Sparkplug message's seq is still followed) and counted
    # (`rate_limited`): a flood costs the agent's network thread little besides paho's own
    # work, and is seen (edge_agent/ingest/rates). 0: no limit.
    max_messages_per_s: float = Field(default=2_000.0, ge=0)
    message_burst_s: float = Field(default=10.0, gt=0)
    # The unscored stream (open slots, window ring) is written this often, so that a kill -9
    # loses at most this long of it (edge_agent/stream_state); 0: only at a graceful stop.
    checkpoint_s: float = Field(default=5.0, ge=0)


class ModelChoice(BaseModel):
    """How the agent runs models; `bundle` is served until a rollout installs one."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path | None = None  # a bundle directory or .tar, verified with the pinned key
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    threads: int = Field(default=0, ge=0)  # ONNX Runtime intra-op threads; 0: its default
    # This device's profile (e.g. jetson-orin-nx): picks the bundle's prebuilt TensorRT engine.
    profile: str = ""

    @field_validator("bundle", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: leave it out, or name a bundle directory or .tar")
        return value


class BatchingPolicy(BaseModel):
    """Dynamic batching across assets: run when `max_batch` windows wait or the oldest waited
    `max_wait_ms`."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(default=64, ge=1, le=4096)
    max_wait_ms: float = Field(default=20.0, ge=0)


class DecisionPolicy(BaseModel):
    """Alert hysteresis on the smoothed score (>= 1 means fault): raise when `k` of the last
    `n` scores reach `raise_at`, clear when `k` of the last `n` are below `clear_at`."""

    model_config = ConfigDict(extra="forbid")

    raise_at: float = Field(default=1.0, gt=0)
    clear_at: float = Field(default=0.8, gt=0)
    k: int = Field(default=3, ge=1)
    n: int = Field(default=5, ge=1)
    top_sensors: int = Field(default=3, ge=1)
    # A site calibration (on the inference thread) not done within this fails: said, counted
    # (`calibration_timeout`), its rows collected again; the pipeline waits no longer for it.
    calibration_timeout_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> DecisionPolicy:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        if self.clear_at > self.raise_at:
            raise ValueError(
                f"clear_at ({self.clear_at}) must not exceed raise_at ({self.raise_at})"
            )
        return self

    def at_least(self, windows: int) -> DecisionPolicy:
        """This policy with `k` raised to the model's debounce (`alert_windows`, fitted so
        that normal operation's runs of high scores stay shorter): the stricter one wins."""
        if windows <= self.k:
            return self
        return self.model_copy(update={"k": windows, "n": max(self.n, windows + 2)})


class OutboxPolicy(BaseModel):
    """What is kept for the control plane while it cannot be reached, and how much."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(default=256 << 20, ge=1 << 16)  # records and the pages they take
    # Free space the outbox leaves on its file system: under it, new records displace the
    # oldest captures and predictions instead of growing it (None: 2 % of the file system,
    # 64 MiB to 1 GiB, at most a quarter of it).
    reserve_bytes: int | None = Field(default=None, ge=0)
    # Keep every n-th prediction per asset (1: all); windows at or above the decision's
    # clear threshold are always kept. Alert events are always kept.
    prediction_every: int = Field(default=10, ge=1)


class CapturePolicy(BaseModel):
    """Raw windows kept for retraining (`edge_agent/capture.py`): every raised alert's window
    and a stratified sample of normal ones, within a daily byte budget. A site setting (its
    disk and uplink), so it lives here rather than in the model bundle."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_bytes_per_day: int = Field(default=16 << 20, ge=0)  # encoded records, alerts included
    windows_per_alert: int = Field(default=8, ge=1)  # the raise's, then while it stays open
    alert_spacing: int = Field(default=4, ge=1)  # windows between those
    sample_share: float = Field(default=0.5, ge=0.0, le=1.0)  # of it normal samples may use
    samples_per_day: int = Field(default=48, ge=0)  # normal windows, spread over the strata
    sample_probability: float = Field(default=0.02, ge=0.0, le=1.0)  # per normal window


class SyncPolicy(BaseModel):
    """Record batches to the control plane."""

    model_config = ConfigDict(extra="forbid")

    # 2,000 predictions are ~250 KB: the per-batch costs (an outbox read and ack, a store
    # transaction) are spread over 4x more records than at 500 (make bench-sync).
    batch_records: int = Field(default=2000, ge=1, le=10_000)
    max_in_flight: int = Field(default=4, ge=1, le=64)


class ShadowPolicy(BaseModel):
    """Shadow evaluation of a rollout's candidate beside the serving model."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=30.0, gt=0)  # how often to compare and report
    # Recent aligned rows kept per asset to compare on (calibration rows + scored rows).
    history_rows: int = Field(default=3000, ge=10)


class UpdatePolicy(BaseModel):
    """Downloads of new model versions."""

    model_config = ConfigDict(extra="forbid")

    download_attempts: int = Field(default=6, ge=1)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)


class MetricsPolicy(BaseModel):
    """Prometheus /metrics and /healthz/{live,ready} over plain HTTP."""

    model_config = ConfigDict(extra="forbid")

    # HOST:PORT; empty: off. Localhost by default: expose it wider on purpose (0.0.0.0:9465
    # for a scraper on the network; nothing on it needs a secret, but it says a lot).
    listen: str = "127.0.0.1:9465"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return check_listen(value, optional=True)


class AgentConfig(BaseSettings):
    """The agent's settings; see docs in edge_agent/agent.example.yaml."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOGLM_EDGE_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path
    cloud: CloudLink = Field(default_factory=CloudLink)
    reconnect: ReconnectPolicy = Field(default_factory=ReconnectPolicy)
    mqtt: MqttLink = Field(default_factory=MqttLink)
    assets: list[AssetConfig] = Field(default_factory=list)
    ingest: IngestLimits = Field(default_factory=IngestLimits)
    model: ModelChoice = Field(default_factory=ModelChoice)
    batching: BatchingPolicy = Field(default_factory=BatchingPolicy)
    decisions: DecisionPolicy = Field(default_factory=DecisionPolicy)
    outbox: OutboxPolicy = Field(default_factory=OutboxPolicy)
    capture: CapturePolicy = Field(default_factory=CapturePolicy)
    sync: SyncPolicy = Field(default_factory=SyncPolicy)
    shadow: ShadowPolicy = Field(default_factory=ShadowPolicy)
    updates: UpdatePolicy = Field(default_factory=UpdatePolicy)
    metrics: MetricsPolicy = Field(default_factory=MetricsPolicy)
    # Alerts back to SCADA as Sparkplug B: the agent's own edge node, one device per asset.
    sparkplug_out: SparkplugId | None = None
    # Alerts back to SCADA as OPC UA nodes on a small server of the agent's own.
    opcua_out: OpcUaOut | None = None
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with ids

    @model_validator(mode="after")
    def _unique_assets(self) -> AgentConfig:
        names = [a.name for a in self.assets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"assets: duplicate names {duplicates}")
        sources = [
            f"{a.sparkplug.group}/{a.sparkplug.edge_node}/{a.sparkplug.device}"
            for a in self.assets
            if a.sparkplug is not None
        ]
        twice = sorted({s for s in sources if sources.count(s) > 1})
        if twice:
            raise ValueError(f"assets: Sparkplug sources given to two assets: {twice}")
        sparkplug_topics = [t for a in self.assets for t in a.topics if t.startswith("spBv1.0/")]
        if sparkplug_topics:
            raise ValueError(
                f"assets: {sparkplug_topics[0]!r} is Sparkplug B's namespace: use "
                "`sparkplug: {group, edge_node, device}` instead of topics"
            )
        return self


def load_agent_config(path: Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    return load_settings(AgentConfig, path, overrides)
