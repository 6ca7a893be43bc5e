"""Sessions and authorisation over real mutual TLS: heartbeats, presence, revocation, refusals."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud.service.sessions import SessionHub
from edge_agent.enroll import enroll
from edge_agent.errors import PermissionDenied, Unauthenticated
from edge_agent.identity import identity_dir, load_identity
from edge_agent.session import DEAD_AFTER_S
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.conftest import register
from tests.support.agents import enroll_identity, start_session, wait_for
from tests.support.cloud import RunningPlane
from tests.support.proxy import BlackholeProxy

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device(plane: RunningPlane, name: str) -> operator_pb2.Device:
    with plane.client() as client:
        return client.get_device(name)


def test_heartbeats_make_the_device_online_with_its_status(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "pump-1", site="a"), tmp_path / "a")
    agent = start_session(identity, heartbeat_interval_s=0.1, model_version="7")
    try:
        took = wait_for(lambda: _device(plane, "pump-1").online, timeout=5)
        wait_for(lambda: agent.session.stats.heartbeats_acked >= 3)
        device = _device(plane, "pump-1")
        assert device.status.model_version == "7"
        assert device.host.hostname == "test-host"
        assert device.agent_version
        assert took < 5
    finally:
        agent.stop()
    wait_for(lambda: not _device(plane, "pump-1").online, timeout=5)


def test_revoke_while_connected_ends_the_session_and_refuses_reconnects(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    agent = start_session(identity, heartbeat_interval_s=5.0)  # no heartbeat will wake it
    try:
        wait_for(lambda: agent.session.connected)
        with plane.client() as client:
            client.revoke_device("pump-1", "stolen")
        took = wait_for(lambda: agent.session.stats.refused, timeout=5)
        assert took < 2, f"the open session took {took:.1f}s to end"
        assert "revoked" in agent.session.stats.last_error
        assert not agent.session.connected
        device = _device(plane, "pump-1")
        assert device.state == operator_pb2.Device.STATE_REVOKED and not device.online
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_revoked_agent_process_stops_with_a_clear_exit_code(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """`autoglm-edge run` for a revoked device ends (exit code 6, 'revoked', what to do)
    instead of retrying forever."""
    identity = enroll_identity(register(plane, "pump-9"), tmp_path / "state")
    with plane.client() as client:
        client.revoke_device("pump-9", "decommissioned")
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "mqtt": {"host": "127.0.0.1", "port": free_port()},
                "assets": [{"name": "pump", "topics": ["plant/pump/+"]}],
                "reconnect": {"initial_s": 0.1, "max_s": 0.5},
            }
        )
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "autoglm-edge"), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")},
    )
    assert result.returncode == 6, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "permission denied" in last and "revoked" in last and "register" in last, last
    assert "Traceback" not in result.stderr
    assert identity.info.device_name == "pump-9"


@pytest.mark.slow
def test_a_partition_that_swallows_packets_is_noticed_and_the_session_comes_back(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """No reset, no FIN, just silence: the session watchdog ends the dead session after
    DEAD_AFTER_S (15 s) of silence, also with regular heartbeats far apart."""
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    port = int(plane.device_address.rsplit(":", 1)[1])
    proxy = BlackholeProxy(("127.0.0.1", port))
    # An attempt made while the path swallowed its handshake waits out the setup timeout.
    agent = start_session(
        identity,
        heartbeat_interval_s=300.0,
        device_address=f"127.0.0.1:{proxy.port}",
        setup_timeout_s=DEAD_AFTER_S,
    )
    try:
        wait_for(lambda: agent.session.connected, timeout=30)
        proxy.blackhole()
        took = wait_for(lambda: not agent.session.connected, timeout=120, interval=0.2)
        limit = 3 * DEAD_AFTER_S  # generous on a busy machine
        assert took < limit, f"the dead session was noticed after {took:.1f}s"
        proxy.heal()
        wait_for(lambda: agent.session.connected, timeout=120, interval=0.2)
        assert agent.session.stats.sessions_opened >= 2
    finally:
        agent.stop()
        proxy.close()


def test_a_session_setup_waits_its_own_timeout_not_the_dead_path_bound(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """Connecting, the handshake and the hello have `setup_timeout_s` together, longer than
    `dead_after_s`: in a reconnect storm an agent that gave up on a queued handshake after
    the dead-path bound threw its work away and queued again (bench_heartbeats --storm)."""
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    port = int(plane.device_address.rsplit(":", 1)[1])
    proxy = BlackholeProxy(("127.0.0.1", port))
    proxy.blackhole()  # the handshake goes unanswered
    t0 = time.monotonic()
    agent = start_session(
        identity, device_address=f"127.0.0.1:{proxy.port}", dead_after_s=2.0, setup_timeout_s=6.0
    )
    try:
        wait_for(lambda: agent.session.stats.attempts_failed >= 1, timeout=120, interval=0.1)
        took = time.monotonic() - t0
        error = agent.session.stats.last_error
        assert "no answer to the session's hello within 6s" in error, error
        assert took >= 5.9, f"the attempt gave up after {took:.1f}s, before its setup timeout"
        proxy.heal()
        wait_for(lambda: agent.session.connected, timeout=120, interval=0.2)
    finally:
        agent.stop()
        proxy.close()


def test_an_agent_told_to_stop_while_its_session_opens_stops_at_once(
    plane: RunningPlane, tmp_path: Path
) -> None:
    """Stopping does not wait out the setup timeout (systemd and Kubernetes give 30 s)."""
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    port = int(plane.device_address.rsplit(":", 1)[1])
    proxy = BlackholeProxy(("127.0.0.1", port))
    proxy.blackhole()  # the attempt hangs in its handshake
    agent = start_session(identity, device_address=f"127.0.0.1:{proxy.port}", setup_timeout_s=600)
    try:
        wait_for(lambda: bool(proxy._open), timeout=60, interval=0.05)  # the attempt is on
        t0 = time.monotonic()
        agent.loop.call_soon_threadsafe(agent.stop_event.set)
        agent.thread.join(120)
        took = time.monotonic() - t0
        assert not agent.thread.is_alive(), "the session did not stop within 120 s"
        assert took < 60, f"stopping took {took:.1f}s (the setup timeout is 600 s)"
        assert agent.session.stats.attempts_failed == 0, agent.session.stats.last_error
    finally:
        agent.stop()
        proxy.close()


def test_reenrolled_device_invalidates_its_old_certificate(
    plane: RunningPlane, tmp_path: Path
) -> None:
    first = register(plane, "pump-1")
    old = enroll_identity(first, tmp_path / "old")
    with plane.client() as client:
        renewal = client.issue_enrollment_token("pump-1")
    enroll(first.model_copy(update={"token": renewal.enrollment_token}), tmp_path / "new")
    agent = start_session(old)
    try:
        wait_for(lambda: agent.session.stats.refused)
        assert "no longer current" in agent.session.stats.last_error
    finally:
        agent.stop()
    good = start_session(load_identity(tmp_path / "new"))
    try:
        wait_for(lambda: good.session.connected)
    finally:
        good.stop()


def test_reenrolling_ends_the_session_the_old_certificate_holds_open(
    plane: RunningPlane, tmp_path: Path
) -> None:
    first = register(plane, "pump-1")
    old = start_session(enroll_identity(first, tmp_path / "old"))
    try:
        wait_for(lambda: old.session.connected, timeout=30)
        with plane.client() as client:
            renewal = client.issue_enrollment_token("pump-1")
        enroll(first.model_copy(update={"token": renewal.enrollment_token}), tmp_path / "new")
        # Within auth_recheck_interval_s (0.5 s here) the open session ends, and the old
        # certificate cannot open another.
        wait_for(lambda: old.session.stats.refused, timeout=30)
        assert "re-enrolled" in old.session.stats.last_error or "no longer current" in (
            old.session.stats.last_error
        ), old.session.stats.last_error
    finally:
        old.stop()


def test_device_calls_on_the_api_port_need_a_certificate(plane: RunningPlane) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello())
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Session(iter([hello]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "mutual TLS" in (err.value.details() or "")


def test_device_port_refuses_a_client_without_certificate(plane: RunningPlane) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.device_address, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Session(iter([agent_pb2.AgentMessage(hello=agent_pb2.Hello())]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_session_must_start_with_hello(plane: RunningPlane, tmp_path: Path) -> None:
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    creds = identity.credentials()
    with grpc.secure_channel(plane.device_address, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Session(iter([beat]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_operator_calls_need_a_valid_token(plane: RunningPlane) -> None:
    with (
        plane.client(token="agt_op_not-a-real-token") as client,
        pytest.raises(Unauthenticated, match="not valid"),
    ):
        client.list_devices()
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.ListDevices(
                operator_pb2.ListDevicesRequest(),
                metadata=(("authorization", "Basic x"),),
                timeout=10,
            )
        assert "Bearer" in (err.value.details() or "")


def test_a_device_certificate_is_no_operator_credential(
    plane: RunningPlane, tmp_path: Path
) -> None:
    identity = enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    creds = identity.credentials()
    with grpc.secure_channel(plane.device_address, creds) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RevokeDevice(operator_pb2.RevokeDeviceRequest(device="pump-1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _device(plane, "pump-1").state == operator_pb2.Device.STATE_ACTIVE


def test_every_operator_call_of_the_contract_is_served() -> None:
    from cloud.service.operator import OperatorServicer

    service = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]
    base = operator_pb2_grpc.OperatorServiceServicer
    missing = [
        m.name
        for m in service.methods
        if getattr(OperatorServicer, m.name) is getattr(base, m.name)
    ]
    assert missing == []


def test_operator_errors_are_clear(plane: RunningPlane) -> None:
    from edge_agent.errors import AlreadyExists, InvalidInput, NotFound

    register(plane, "pump-1")
    with plane.client() as client:
        with pytest.raises(AlreadyExists, match="pump-1"):
            client.register_device(operator_pb2.RegisterDeviceRequest(name="pump-1"))
        with pytest.raises(InvalidInput, match="device name"):
            client.register_device(operator_pb2.RegisterDeviceRequest(name="has space"))
        with pytest.raises(NotFound, match="ghost"):
            client.revoke_device("ghost", "")
        with pytest.raises(InvalidInput, match="selector"):
            client.list_devices("site=a=b")
        labelled = client.label_device("pump-1", {"line": "2"}, [])
        assert dict(labelled.labels) == {"line": "2"}


def test_health_and_reflection_are_served(plane: RunningPlane) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "autoglm.v1.OperatorService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(refl.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
    assert {
        "autoglm.v1.AgentService",
        "autoglm.v1.OperatorService",
        "autoglm.v1.EnrollmentService",
    } <= names


def test_corrupt_identity_is_a_clear_error(plane: RunningPlane, tmp_path: Path) -> None:
    from edge_agent.errors import IntegrityError

    enroll_identity(register(plane, "pump-1"), tmp_path / "a")
    (identity_dir(tmp_path / "a") / "identity.yaml").write_text("device_id: [")
    with pytest.raises(IntegrityError, match="corrupt"):
        load_identity(tmp_path / "a")


def test_agent_reconnects_after_a_control_plane_restart(tmp_path: Path) -> None:
    from tests.support.cloud import init_plane, start_plane

    state = tmp_path / "cloud"
    token = init_plane(state).operator_token
    first = start_plane(state, token, presence_flush_interval_s=0.2)
    ports = (first.plane.api_port, first.plane.device_port)
    agent = None
    second = None
    try:
        agent = start_session(enroll_identity(register(first, "pump-1"), tmp_path / "a"))
        wait_for(lambda: agent.session.connected)
        first.stop()
        wait_for(lambda: not agent.session.connected)
        assert agent.session.stats.last_error  # it noticed, and is backing off
        second = start_plane(
            state,
            token,
            api_listen=f"127.0.0.1:{ports[0]}",
            device_listen=f"127.0.0.1:{ports[1]}",
            presence_flush_interval_s=0.2,
        )
        wait_for(lambda: agent.session.stats.sessions_opened == 2, timeout=15)
        wait_for(lambda: _device(second, "pump-1").online, timeout=5)
    finally:
        if agent is not None:
            agent.stop()
        if second is not None:
            second.stop()


def test_the_probe_port_serves_health_in_plain_text_and_nothing_else(tmp_path: Path) -> None:
    from tests.support.cloud import init_plane, start_plane

    state = tmp_path / "cloud"
    plane = start_plane(state, init_plane(state).operator_token, health_listen="127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plane.plane.health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="autoglm.v1.OperatorService"), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                operator_pb2_grpc.OperatorServiceStub(channel).ListDevices(
                    operator_pb2.ListDevicesRequest(), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        plane.stop()


def test_a_session_outlives_control_plane_restarts_mid_heartbeat(tmp_path: Path) -> None:
    """Heartbeats every 10 ms make a write land on a stream the restart just ended (seen in
    CI as `RPC already finished` killing the session thread); the session must reconnect."""
    from tests.support.cloud import init_plane, start_plane

    state = tmp_path / "cloud"
    plane = start_plane(state, init_plane(state).operator_token)
    port = plane.plane.device_port
    identity = enroll_identity(register(plane, "pump-r"), tmp_path / "a")
    agent = start_session(identity, heartbeat_interval_s=0.01)
    try:
        for _ in range(8):
            wait_for(lambda: agent.session.connected, timeout=15)
            plane.stop()
            plane = start_plane(state, plane.token, device_listen=f"127.0.0.1:{port}")
        wait_for(lambda: agent.session.connected, timeout=15)
        assert agent.thread.is_alive()
        assert agent.session.stats.sessions_opened >= 9
    finally:
        agent.stop()
        plane.stop()


def test_a_session_opened_after_the_check_began_is_not_judged_by_it() -> None:
    async def scenario() -> tuple[int, list[object]]:
        hub = SessionHub()
        old = hub.open("d1", "fp-old")
        since = time.monotonic()
        new = hub.open("d1", "fp-new")  # re-enrolled and reconnected during the store read
        ended = hub.end_stale(
            ["d1"], {"d1": (True, frozenset({"fp-old"}))}, PermissionDenied("x"), since
        )
        return ended, [old.outbound.qsize(), new.outbound.qsize()]

    ended, queued = asyncio.run(scenario())
    # The old session was ended by the new one (its one message), not by the check.
    assert ended == 0 and queued == [1, 0]


def test_a_deleted_or_revoked_device_loses_only_the_sessions_checked() -> None:
    async def scenario() -> int:
        hub = SessionHub()
        hub.open("gone", "fp")
        hub.open("fine", "fp")
        since = time.monotonic() + 1  # both opened before the check
        return hub.end_stale(
            ["gone", "fine"], {"fine": (True, frozenset({"fp"}))}, PermissionDenied("x"), since
        )

    assert asyncio.run(scenario()) == 1


def test_a_session_on_the_certificate_renewed_from_lasts_while_the_grace_does() -> None:
    async def scenario() -> list[int]:
        hub = SessionHub()
        hub.open("d1", "fp-old")  # opened before the device renewed
        since = time.monotonic() + 1
        in_grace = {"d1": (True, frozenset({"fp-new", "fp-old"}))}
        after = {"d1": (True, frozenset({"fp-new"}))}
        return [
            hub.end_stale(["d1"], in_grace, PermissionDenied("x"), since),
            hub.end_stale(["d1"], after, PermissionDenied("x"), since),
        ]

    assert asyncio.run(scenario()) == [0, 1]
