"""Sparkplug B in: NBIRTH/DBIRTH/NDATA/DDATA/NDEATH/DDEATH of the edge nodes the config
names, decoded into the same readings (chunks) as the JSON forms, judged by the same clock
bounds and counted by the same drop reasons.

Births define metrics and are not taken as readings (their values are snapshots stamped
at birth time). Per edge node it keeps what its births said: the alias of every metric
(data messages may carry aliases only) and datatypes, the birth's `bdSeq` (a death
certificate with another one belongs to an older session and is ignored) and the last
`seq` (0-255, one counter across the node's and its devices' messages). A sequence gap, an
unknown alias or data from a node that has not been born since the agent connected makes
it ask for a rebirth (NCMD `Node Control/Rebirth`, at most once per `REBIRTH_EVERY_S` per
node). A death forgets the node's (or device's) births: its sensors get no readings until
it is born again, so their slots are masked like any missing reading. The messages of a
configured node's devices that no asset maps are subscribed to for their `seq` only: they
are parsed, nothing else, and leave no state behind.

Runs in the MQTT network thread; nothing here raises on input.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from edge_agent.config import AssetConfig
from edge_agent.ingest.decode import (
    Chunk,
    Decoder,
    TopicRoutes,
    median,
    plausible_time,
    value_reason,
)
from protos.sparkplug import sparkplug_b_pb2 as spb

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
REBIRTH_EVERY_S = 5.0
MAX_ALIASES = 10_000  # per node: a birth cannot grow memory without bound
SPARKPLUG_DROPS = (
    "not_sparkplug",  # not a Sparkplug B payload (protobuf)
    "not_born",  # data from a node or device with no birth since the agent connected
    "unknown_alias",  # a metric alias its birth did not define
    "sequence_gap",  # seq not the one after the last (the message is kept; rebirth asked)
    "null_value",  # a metric sent as null
    "duplicate_alias",  # a birth gave one alias to two metrics (the first keeps it)
)

# Sparkplug B datatypes (the specification's DataType enum).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN = 9, 10, 11
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_NUMERIC = {INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FLOAT, DOUBLE, BOOLEAN}


def topics_for(assets: Sequence[AssetConfig]) -> list[str]:
    """The subscriptions that carry the configured edge nodes' messages: the node's own and
    those of all its devices, mapped or not, since `seq` counts them all (one device's
    messages alone would look like a gap each time another device spoke)."""
    topics: list[str] = []
    for a in assets:
        if a.sparkplug is not None:
            group, node = a.sparkplug.group, a.sparkplug.edge_node
            topics.append(f"{NAMESPACE}/{group}/+/{node}")
            topics.append(f"{NAMESPACE}/{group}/+/{node}/+")
    return list(dict.fromkeys(topics))


@dataclass
class NodeState:
    born: bool = False
    bd_seq: int | None = None
    seq: int | None = None
    # (device or "" for the node) -> alias -> (metric name, datatype)
    aliases: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    # (device or "") -> metric name -> datatype
    types: dict[str, dict[str, int]] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    rebirth_asked_at: float = -math.inf


class SparkplugDecoder:
    def __init__(
        self,
        assets: Sequence[AssetConfig],
        routes: TopicRoutes,
        base: Decoder,
        publish: Callable[[str, bytes], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self.base = base  # its drop counter, stream clocks and bounds
        self.publish = publish  # set once the MQTT connection exists (rebirth requests)
        self.clock = clock
        self._assets: dict[tuple[str, str, str], int] = {}
        for i, a in enumerate(assets):
            if a.sparkplug is not None:
                key = (a.sparkplug.group, a.sparkplug.edge_node, a.sparkplug.device)
                self._assets[key] = i
        self._configured = {(g, n) for g, n, _ in self._assets}
        # Devices learnt per node: only those an asset names (anyone may publish births).
        self._devices = {(g, n, d) for g, n, d in self._assets if d}
        self.nodes: dict[tuple[str, str], NodeState] = {}
        self.rebirths_requested = 0
        self.births = 0
        self.deaths = 0

    def handles(self, topic: str) -> bool:
        return topic.startswith(NAMESPACE + "/")

    def decode(self, topic: str, payload: bytes) -> list[Chunk] | None:
        try:
            return self._decode(topic, payload)
        except Exception as exc:  # noqa: BLE001 - a message the checks below did not foresee
            self.base.drop("not_sparkplug", topic, repr(exc).encode())
            return None

    def _decode(self, topic: str, payload: bytes) -> list[Chunk] | None:
        parts = topic.split("/")
        # Node kinds on spBv1.0/<group>/<kind>/<node>, device kinds one level further: an
        # NBIRTH on a device topic would reset the whole node, a DBIRTH on a node topic its
        # node-level aliases.
        if not (
            (len(parts) == 4 and parts[2] in _NODE_KINDS)
            or (len(parts) == 5 and parts[2] in _DEVICE_KINDS and parts[4])
        ):
            self.base.drop("unknown_topic", topic, payload)
            return None
        group, kind, node = parts[1], parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else ""
        if (group, node) not in self._configured:
            self.base.drop("unknown_topic", topic, payload)
            return None
        if kind in ("NCMD", "DCMD"):
            return None  # commands to the node (ours among them): neither data nor state
        if len(payload) > self.base.limits.max_payload_bytes:
            self.base.drop("oversized", topic, payload[:120])
            return None
        message = spb.Payload()
        try:
            message.ParseFromString(payload)
        except (DecodeError, ValueError):
            self.base.drop("not_sparkplug", topic, payload)
            return None
        state = self.nodes.setdefault((group, node), NodeState())
        if kind == "NDEATH":
            self._node_death(state, message, group, node)
            return None
        # Another device of the node (no asset maps it): its seq counts, nothing else; no
        # state is kept per such device, so any number of them costs no memory.
        other = bool(device) and (group, node, device) not in self._devices
        if kind == "NBIRTH":
            self._node_birth(state, message)
        elif not state.born:
            if not other:  # its readings are lost; another device's were not wanted
                self.base.drop("not_born", topic, payload, max(1, len(message.metrics)))
            self._ask_rebirth(state, group, node, "data before its birth")
            return None
        self._check_seq(state, message, topic, payload, group, node)
        if other:
            return None
        if kind == "DBIRTH":
            self._device_birth(state, device, message)
        elif kind == "DDEATH":
            self._forget_device(state, device)
            self.deaths += 1
            return None
        elif kind == "DDATA" and device not in state.devices:
            self.base.drop("not_born", topic, payload, max(1, len(message.metrics)))
            self._ask_rebirth(state, group, node, f"data of device {device!r} before its birth")
            return None
        if kind.endswith("BIRTH"):
            # Births define the metrics; their values are snapshots (often a library's
            # initial zeros) stamped at birth time, which would run ahead of a backlog.
            return None
        asset = self._assets.get((group, node, device))
        if asset is None:
            return None  # a node or device of a configured edge node that no asset maps
        if not self.base.admit(asset, topic):  # a flood: its seq kept, its metrics not read
            return None
        return self._readings(state, asset, device, message, topic, payload, group, node)

    # ---- births and deaths ----
    def _node_birth(self, state: NodeState, message: spb.Payload) -> None:
        state.born = True
        state.seq = None
        state.aliases, state.types, state.devices = {}, {}, set()
        state.bd_seq = None
        for m in message.metrics:
            if m.name == "bdSeq":
                state.bd_seq = int(m.long_value)
        self._learn(state, "", message)
        self.births += 1

    def _device_birth(self, state: NodeState, device: str, message: spb.Payload) -> None:
        state.devices.add(device)
        state.aliases[device], state.types[device] = {}, {}
        self._learn(state, device, message)
        self.births += 1

    def _learn(self, state: NodeState, device: str, message: spb.Payload) -> None:
        """The metrics a birth defines (the first of two that share an alias wins)."""
        aliases = state.aliases.setdefault(device, {})
        types = state.types.setdefault(device, {})
        for m in message.metrics[:MAX_ALIASES]:
            name = _text(m.name)
            if not name:
                continue
            types[name] = m.datatype
            if m.HasField("alias"):
                if aliases.get(m.alias, (name,))[0] != name:
                    self.base.drop("duplicate_alias", "birth", name.encode()[:120])
                    continue  # the first metric keeps the alias
                aliases[m.alias] = (name, m.datatype)

    def _node_death(self, state: NodeState, message: spb.Payload, group: str, node: str) -> None:
        bd_seq = next((int(m.long_value) for m in message.metrics if m.name == "bdSeq"), None)
        if state.bd_seq is not None and bd_seq is not None and bd_seq != state.bd_seq:
            return  # the will of an earlier session of the node
        if state.born:
            log.info("sparkplug: edge node %s/%s died; its sensors wait for a rebirth", group,
                     node)  # fmt: skip
        state.born = False
        state.aliases, state.types, state.devices = {}, {}, set()
        self.deaths += 1

    def _forget_device(self, state: NodeState, device: str) -> None:
        state.devices.discard(device)
        state.aliases.pop(device, None)
        state.types.pop(device, None)

    # ---- sequence and rebirth ----
    def _check_seq(
        self,
        state: NodeState,
        message: spb.Payload,
        topic: str,
        payload: bytes,
        group: str,
        node: str,
    ) -> None:
        if not message.HasField("seq"):
            return
        seq = int(message.seq) % 256
        if state.seq is not None and seq != (state.seq + 1) % 256:
            self.base.drop("sequence_gap", topic, payload)  # counted; the data is kept
            self._ask_rebirth(state, group, node, f"seq {seq} after {state.seq}")
        state.seq = seq

    def _ask_rebirth(self, state: NodeState, group: str, node: str, why: str) -> None:
        now = time.monotonic()
        if self.publish is None or now - state.rebirth_asked_at < REBIRTH_EVERY_S:
            return
        state.rebirth_asked_at = now
        command = spb.Payload(timestamp=int(self.clock() * 1000))
        metric = command.metrics.add(name=REBIRTH_METRIC, datatype=BOOLEAN)
        metric.timestamp = command.timestamp
        metric.boolean_value = True
        self.publish(f"{NAMESPACE}/{group}/NCMD/{node}", command.SerializeToString())
        self.rebirths_requested += 1
        log.info("sparkplug: asked edge node %s/%s for a rebirth (%s)", group, node, why)

    # ---- readings ----
    def _readings(
        self,
        state: NodeState,
        asset: int,
        device: str,
        message: spb.Payload,
        topic: str,
        payload: bytes,
        group: str,
        node: str,
    ) -> list[Chunk] | None:
        now = self.clock()
        default_ms = message.timestamp if message.HasField("timestamp") else int(now * 1000)
        aliases = state.aliases.get(device, {})
        types = state.types.get(device, {})
        by_sensor: dict[int, tuple[list[float], list[float]]] = {}
        for m in message.metrics:
            text = _text(m.name)
            if text is None:
                self.base.drop("not_sparkplug", topic, payload)
                continue
            if text:
                name, datatype = text, m.datatype or types.get(text, 0)
            elif m.HasField("alias") and m.alias in aliases:
                name, known = aliases[m.alias]
                datatype = m.datatype or known
            else:
                self.base.drop("unknown_alias", topic, payload)
                self._ask_rebirth(state, group, node, f"unknown alias {m.alias}")
                continue
            if name == "bdSeq" or name.startswith("Node Control/"):
                continue
            sensor = self.routes.sensor(asset, name)
            if sensor < 0:
                self.base.drop("unknown_sensor", topic, payload)
                continue
            if m.is_null:
                self.base.drop("null_value", topic, payload)
                continue
            value = metric_value(m, datatype)
            if value is None:
                self.base.drop("bad_type", topic, payload)
                continue
            reason = value_reason(value)
            if reason:
                self.base.drop(reason, topic, payload)
                continue
            ms = m.timestamp if m.HasField("timestamp") else default_ms
            if not plausible_time(ms / 1000.0):
                self.base.drop("bad_timestamp", topic, payload)
                continue
            times, values = by_sensor.setdefault(sensor, ([], []))
            times.append(ms / 1000.0)
            values.append(value)
        if not by_sensor:
            return None
        bounds = self.base.bounds(asset, now)
        all_ts = [t for ts, _ in by_sensor.values() for t in ts]
        self.base.observe(asset, median(all_ts), now)
        chunks = []
        for sensor, (times, values) in by_sensor.items():
            ts = np.asarray(times, dtype=np.float64)
            keep = self.base.time_reasons(ts, bounds, topic, payload)
            if keep.any():
                chunk_values = np.asarray(values, dtype=np.float64)[keep]
                chunks.append(Chunk(asset, sensor, ts[keep], chunk_values))
                self.base.accepted += int(keep.sum())
        return chunks or None


_NODE_KINDS = {"NBIRTH", "NDEATH", "NDATA", "NCMD"}
_DEVICE_KINDS = {"DBIRTH", "DDEATH", "DDATA", "DCMD"}


def _text(value: object) -> str | None:
    """A metric name as text; None when it is not (bytes: not valid UTF-8)."""
    return value if isinstance(value, str) else None


def metric_value(m: spb.Payload.Metric, datatype: int) -> float | None:
    """The metric's value as a number (booleans 0/1), or None for a non-numeric one."""
    if datatype and datatype not in _NUMERIC:  # String, DateTime, DataSet, ...
        return None
    which = m.WhichOneof("value")
    if which == "boolean_value":
        return 1.0 if m.boolean_value else 0.0
    if which == "float_value":
        return float(m.float_value)
    if which == "double_value":
        return float(m.double_value)
    if which in ("int_value", "long_value"):
        raw = int(m.int_value if which == "int_value" else m.long_value)
        bits = _SIGNED_BITS.get(datatype)
        if bits is not None:  # signed types travel as two's complement in the unsigned field
            raw &= (1 << bits) - 1
            if raw >= 1 << (bits - 1):
                raw -= 1 << bits
        return float(raw)
    return None
