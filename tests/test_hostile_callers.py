"""Hostile callers on SQLite and PostgreSQL: every field out of its bounds is refused at the
service edge with INVALID_ARGUMENT naming the field, one bad device never degrades service
for the others, and fuzzed requests never get an INTERNAL answer."""

from __future__ import annotations

import datetime as dt
import math
import queue
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cloud.presence import PresenceTracker
from cloud.service.bounds import MAX_SECONDS, MIN_SECONDS
from cloud.service.guard import MAX_DETAILS
from edge_agent.identity import DeviceIdentity
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc, common_pb2, operator_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.cloud import BACKENDS, RunningPlane, plane_on_backend

pytestmark = [pytest.mark.integration]
OPERATOR = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]
FUZZ_CALLS_PER_METHOD = 12


@pytest.fixture(params=BACKENDS)
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningPlane]:
    yield from plane_on_backend(request, tmp_path, presence_flush_interval_s=0.1)


class DeviceStream:
    """A raw session stream of an enrolled device: what a hostile device can send."""

    def __init__(self, plane: RunningPlane, identity: DeviceIdentity) -> None:
        self.channel = grpc.secure_channel(
            plane.device_address,
            identity.credentials(),
            options=[("grpc.max_send_message_length", 16 << 20)],
        )
        self.outbound: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        self.inbound: queue.Queue[agent_pb2.ControlMessage | grpc.RpcError | None] = queue.Queue()
        stub = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.call = stub.Session(iter(self.outbound.get, None), timeout=60)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def accepted(cls, plane: RunningPlane, identity: DeviceIdentity) -> DeviceStream:
        """A stream that said hello and whose session the plane accepted."""
        stream = cls(plane, identity)
        stream.send(_hello())
        stream.next("accepted")
        return stream

    def _read(self) -> None:
        try:
            for message in self.call:
                self.inbound.put(message)
            self.inbound.put(None)
        except grpc.RpcError as exc:
            self.inbound.put(exc)

    def send(self, message: agent_pb2.AgentMessage) -> None:
        self.outbound.put(message)

    def next(self, kind: str) -> agent_pb2.ControlMessage:
        """The next control message of `kind` (skipping others); fails on the stream's end."""
        while True:
            item = self.inbound.get(timeout=30)
            if item is None or isinstance(item, grpc.RpcError):
                raise AssertionError(f"session ended before a {kind}: {item}")
            if item.WhichOneof("body") == kind:
                return item

    def ending(self) -> grpc.RpcError | None:
        """How the stream ended: the error, or None when it closed with OK."""
        while True:
            item = self.inbound.get(timeout=30)
            if item is None or isinstance(item, grpc.RpcError):
                return item

    def close(self) -> None:
        self.outbound.put(None)
        self.channel.close()


def _device(plane: RunningPlane, tmp_path: Path, name: str) -> DeviceIdentity:
    return enroll_identity(register(plane, name, site="a"), tmp_path / name)


def _hello(agent_version: str = "1.0", status: agent_pb2.AgentStatus | None = None) -> Any:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            agent_version=agent_version,
            status=status or agent_pb2.AgentStatus(model_version="1"),
            host=common_pb2.HostFacts(hostname="edge"),
        )
    )


def _prediction(sequence: int, asset: str = "pump-1", seconds: int = 1_790_000_000) -> Any:
    record = agent_pb2.Record(sequence=sequence)
    record.prediction.asset = asset
    record.prediction.window_start.seconds = seconds - 10
    record.prediction.window_end.seconds = seconds
    record.prediction.score = 0.5
    record.prediction.model_version = "1"
    return record


def test_a_long_agent_version_is_refused_and_presence_goes_on_for_the_others(
    plane: RunningPlane, tmp_path: Path
) -> None:
    hostile = DeviceStream(plane, _device(plane, tmp_path, "hostile"))
    hostile.send(_hello(agent_version="v" * 40))
    ended = hostile.ending()
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended
    assert "hello.agent_version" in (ended.details() or "")
    hostile.close()
    good = DeviceStream.accepted(plane, _device(plane, tmp_path, "good"))
    plane.flush_presence()
    with plane.client() as client:
        devices = {d.name: d for d in client.list_devices()}
    assert devices["good"].online and devices["good"].agent_version == "1.0"
    good.close()


def test_one_update_the_database_refuses_does_not_stop_presence_for_the_fleet(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """Behind the edge check: were a value ever refused by the database, the rest of the
    flush is still written (the grouped write falls back to one update per device)."""
    bad = _device(plane, tmp_path, "bad").info.device_id
    good = _device(plane, tmp_path, "good").info.device_id
    tracker = PresenceTracker(plane.plane.store, encode=dict)
    tracker.seen(bad, agent_version="v" * 40 if _is_postgres(plane) else "x\x00y")
    tracker.seen(good, agent_version="2.0")
    if _is_postgres(plane):
        assert tracker.flush() == 2  # the bad one is logged and dropped
    else:
        tracker.flush()  # SQLite keeps any string: both are written
    assert plane.plane.store.get_device(good).agent_version == "2.0"


def _is_postgres(plane: RunningPlane) -> bool:
    return plane.config.resolved_database_url.startswith("postgres")


def test_a_huge_status_is_refused_and_device_lists_stay_usable(
    plane: RunningPlane, tmp_path: Path
) -> None:
    stream = DeviceStream(plane, _device(plane, tmp_path, "chatty"))
    status = agent_pb2.AgentStatus(model_version="1")
    for i in range(5000):  # 0.6 MB
        status.health.ingest_rate_per_s[f"sensor-{i:04d}-" + "x" * 100] = 1.0
    stream.send(_hello(status=status))
    ended = stream.ending()
    assert ended is not None and ended.code() == grpc.StatusCode.INVALID_ARGUMENT, ended
    assert "hello.status" in (ended.details() or ""), ended.details()
    stream.close()
    with plane.client() as client:
        assert [d.name for d in client.list_devices()] == ["chatty"]


def test_bad_records_are_rejected_by_name_and_the_rest_of_the_batch_is_stored(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = _device(plane, tmp_path, "edge")
    stream = DeviceStream.accepted(plane, identity)
    alert = agent_pb2.Record(sequence=5)
    alert.alert.kind = agent_pb2.AlertEvent.KIND_RAISED
    alert.alert.asset = "pump-1"
    alert.alert.window_end.seconds = 1_790_000_000
    for i in range(1000):
        alert.alert.top_sensors.add(sensor=f"s{i}-" + "x" * 1000, contribution=0.1)
    nan = _prediction(6)
    nan.prediction.score = math.nan
    batch = agent_pb2.RecordBatch(
        records=[
            _prediction(1),
            _prediction(2, seconds=2**62),  # out of Timestamp's range
            _prediction(3, asset="a" * 65),  # longer than the column
            _prediction(4, asset="nul\x00"),
            alert,  # 1,000 top sensors of 1 KB
            nan,
            _prediction(7),
        ]
    )
    stream.send(agent_pb2.AgentMessage(records=batch))
    ack = stream.next("batch_ack").batch_ack
    assert ack.up_to_sequence == 7 and ack.stored == 2, ack
    reasons = {r.sequence: r.reason for r in ack.rejected}
    assert sorted(reasons) == [2, 3, 4, 5, 6], reasons
    assert "prediction.window_start" in reasons[2]
    assert "prediction.asset: 65 characters > 64" in reasons[3]
    assert "NUL" in reasons[4]
    assert "alert.top_sensors: 1000 entries > 64" in reasons[5]
    assert "prediction.score" in reasons[6]
    # The session goes on: heartbeats are answered, and reconnecting resumes after 7.
    stream.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1)))
    stream.next("heartbeat_ack")
    stream.close()
    assert plane.plane.store.last_record_sequence(identity.info.device_id) == 7
    stored = plane.plane.store.list_predictions(identity.info.device_id)
    assert sorted(p.sequence for p in stored) == [1, 7]


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        (
            "WatchAlerts",
            operator_pb2.WatchAlertsRequest(after_revision=2**63),
            "after_revision",
        ),
        (
            "ListAlerts",
            operator_pb2.ListAlertsRequest(since={"seconds": -(2**62)}),
            "since",
        ),
        ("RegisterDevice", operator_pb2.RegisterDeviceRequest(name="a\x00b"), "name"),
        ("RegisterDevice", operator_pb2.RegisterDeviceRequest(name="n" * 100_000), "name"),
        ("GetDevice", operator_pb2.GetDeviceRequest(device="d" * 200), "device"),
        (
            "RevokeDevice",
            operator_pb2.RevokeDeviceRequest(device="x", reason="r" * 5000),
            "reason",
        ),
        (
            "CreateRollout",
            operator_pb2.CreateRolloutRequest(
                model_name="m", model_version="v", gates={"min_shadow_agreement": math.nan}
            ),
            "gates.min_shadow_agreement",
        ),
    ],
)
def test_operator_fields_out_of_bounds_are_invalid_arguments_naming_the_field(
    plane: RunningPlane, method: str, request_: Message, field: str
) -> None:
    code, details = _call(plane, method, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(field), details
    assert len(details) <= MAX_DETAILS


def test_fuzzed_operator_requests_never_get_an_internal_answer(plane: RunningPlane) -> None:
    rng = random.Random(20261129)
    answers: dict[str, int] = {}
    internal: list[str] = []
    for method in OPERATOR.methods:
        if method.client_streaming:
            continue
        cls = _message_class(method.input_type)
        for _ in range(FUZZ_CALLS_PER_METHOD):
            request = cls()
            _fill(request, rng, depth=0)
            code, details = _call(plane, method.name, request)
            answers[code.name] = answers.get(code.name, 0) + 1
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                internal.append(f"{method.name}: {details} <- {request!r:.300}")
    assert not internal, f"{len(internal)} internal answers of {sum(answers.values())}: {internal}"
    assert answers.get("INVALID_ARGUMENT", 0) > 0, answers


def _call(plane: RunningPlane, method: str, request: Message) -> tuple[grpc.StatusCode, str]:
    descriptor = OPERATOR.methods_by_name[method]
    response_cls = _message_class(descriptor.output_type)
    path = f"/{OPERATOR.full_name}/{method}"
    credentials = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, credentials) as channel:
        metadata = (("authorization", f"Bearer {plane.token}"),)
        try:
            if descriptor.server_streaming:
                call = channel.unary_stream(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_cls.FromString,
                )
                for _ in call(request, metadata=metadata, timeout=1.5):
                    break
            else:
                channel.unary_unary(
                    path,
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_cls.FromString,
                )(request, metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _message_class(descriptor: Descriptor) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


_STRINGS = ["", "pump-1", "site=a", "a\x00b", "x" * 65, "é" * 129, "y" * 3000, "../../etc"]
_INTS = [0, 1, 7, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]
_FLOATS = [0.0, 0.5, -1.0, 1e308, math.nan, math.inf]
_SECONDS = [0, 1_790_000_000, -(2**62), 2**62, 253_402_300_800]


def _fill(message: Message, rng: random.Random, depth: int) -> None:
    """Hostile values in a random selection of the message's fields."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.seconds = rng.choice(_SECONDS)  # type: ignore[attr-defined]
        message.nanos = rng.choice([0, 999_999_999, -1, 2**31 - 1])  # type: ignore[attr-defined]
        return
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            entry = field.message_type
            if field.is_repeated and entry.GetOptions().map_entry:
                for _ in range(rng.choice([1, 2, 70])):
                    key = rng.choice(_STRINGS) + str(rng.random())
                    item = _scalar(entry.fields_by_name["value"], rng)
                    if item is not None:
                        if entry.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                            _fill(value[key], rng, depth + 1)
                        else:
                            value[key] = item
            elif field.is_repeated:
                for _ in range(rng.choice([1, 3])):
                    _fill(value.add(), rng, depth + 1)
            else:
                _fill(value, rng, depth + 1)
            continue
        item = _scalar(field, rng)
        if item is None:
            continue
        try:
            if field.is_repeated:
                value.extend([item] * rng.choice([1, 2, 40]))
            else:
                setattr(message, field.name, item)
        except (ValueError, TypeError):  # out of the wire type's own range: not sendable
            pass


def _scalar(field: FieldDescriptor, rng: random.Random) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(_FLOATS)
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if kind == FieldDescriptor.TYPE_BYTES:
        return b"\x00" * rng.choice([0, 10])
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return True
    return rng.choice(_INTS)


def test_the_timestamp_bounds_are_the_range_protobuf_converts() -> None:
    for seconds in (MIN_SECONDS, MAX_SECONDS):
        Timestamp(seconds=seconds).ToDatetime(tzinfo=dt.UTC)
    with pytest.raises((ValueError, OverflowError)):
        Timestamp(seconds=MAX_SECONDS + 1).ToDatetime(tzinfo=dt.UTC)
