"""Certificate renewal: due at a fraction of the certificate's life, signed over the current
mutual TLS, swapped without a restart, kept across agent and control-plane restarts, the old
certificate accepted only for the grace period; a swap a crash interrupted is completed."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud.pki import certificate_fingerprint
from cloud.service.agent import RENEWALS_PER_HOUR
from edge_agent.config import load_agent_config
from edge_agent.errors import PermissionDenied
from edge_agent.identity import (
    CERT_FILE,
    KEY_FILE,
    build_csr,
    identity_dir,
    load_identity,
    new_device_key,
)
from edge_agent.renewal import NEXT, finish_interrupted, renewal_due
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import register
from tests.support.agents import enroll_identity, start_agent, start_session, wait_for
from tests.support.broker import Broker
from tests.support.cloud import init_plane, start_plane

pytestmark = [pytest.mark.integration]


def _pair(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("crashed", ["while_writing", "after_both_written", "after_key_renamed"])
def test_a_swap_a_crash_interrupted_leaves_a_matching_pair(tmp_path: Path, crashed: str) -> None:
    folder = identity_dir(tmp_path)
    folder.mkdir()
    old, new = _pair("old"), _pair("new")
    (folder / KEY_FILE).write_bytes(old[0])
    (folder / CERT_FILE).write_bytes(old[1])
    if crashed == "while_writing":  # the certificate's .next file is cut short
        (folder / (KEY_FILE + NEXT)).write_bytes(new[0])
        (folder / (CERT_FILE + NEXT)).write_bytes(new[1][:40])
        expected = old
    elif crashed == "after_both_written":
        (folder / (KEY_FILE + NEXT)).write_bytes(new[0])
        (folder / (CERT_FILE + NEXT)).write_bytes(new[1])
        expected = new
    else:  # the new key is in place, the certificate not yet
        (folder / KEY_FILE).write_bytes(new[0])
        (folder / (CERT_FILE + NEXT)).write_bytes(new[1])
        expected = new
    finish_interrupted(tmp_path)
    assert (folder / KEY_FILE).read_bytes() == expected[0]
    assert (folder / CERT_FILE).read_bytes() == expected[1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([KEY_FILE, CERT_FILE])


def test_renewal_swaps_credentials_without_a_restart_and_the_old_ones_expire(
    tmp_path: Path, broker: Broker
) -> None:
    cloud_dir = tmp_path / "cloud"
    token = init_plane(cloud_dir).operator_token
    settings = {
        "presence_flush_interval_s": 0.2,
        "auth_recheck_interval_s": 0.3,
    }
    plane = start_plane(cloud_dir, token, **settings)
    device_port = plane.plane.device_port
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1"), state)
    old_identity = load_identity(state)
    kept_old = tmp_path / "old-identity"
    shutil.copytree(identity_dir(state), kept_old / "identity")
    config = load_agent_config(
        None,
        {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.3, "renew_check_s": 0.2},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0},
            "mqtt": {"port": broker.port, "host": "127.0.0.1"},
            "metrics": {"listen": ""},
        },
    )
    running = start_agent(config)
    agent = running.agent
    try:
        wait_for(lambda: agent.session.connected, timeout=30)
        store = plane.plane.store
        before = store.get_device("edge-1")
        assert before.cert_not_after is not None
        due = renewal_due(old_identity, config.cloud.renew_at)
        now = dt.datetime.now(dt.UTC)
        assert due > now + dt.timedelta(days=200), due  # a year's certificate: not due yet
        # The clock moves past the due time once: the agent renews on its own.
        times = iter([due + dt.timedelta(minutes=1)])
        agent.renewer.clock = lambda: next(times, dt.datetime.now(dt.UTC))
        wait_for(lambda: agent.renewer.renewals == 1, timeout=30)
        renewed = load_identity(state)
        leaf = x509.load_pem_x509_certificates(renewed.chain_pem)[0]
        assert renewed.key_pem != old_identity.key_pem
        after = store.get_device("edge-1")
        assert after.cert_fingerprint == certificate_fingerprint(leaf)
        # (the certificate renewed from is forgotten as soon as the new one is used: below)
        assert after.cert_fingerprint != before.cert_fingerprint
        assert after.cert_not_after == leaf.not_valid_after_utc
        # The session reconnected with the new certificate, without a restart.
        wait_for(lambda: agent.session.stats.sessions_opened >= 2 and agent.session.connected)
        assert agent.session.identity.chain_pem == renewed.chain_pem
        assert agent.renewer.renewals == 1  # not due again
        # The device uses its new certificate now: the one it renewed from is refused.
        wait_for(lambda: store.get_device("edge-1").previous_fingerprint == "", timeout=30)
        old = start_session(load_identity(kept_old), device_address=plane.device_address)
        try:
            wait_for(lambda: old.session.stats.refused, timeout=30)
            assert "no longer current" in old.session.stats.last_error
        finally:
            old.stop()

        # A control-plane restart: the renewed certificate is the device's.
        opened = agent.session.stats.sessions_opened
        plane.stop()
        plane = start_plane(cloud_dir, token, device_listen=f"127.0.0.1:{device_port}", **settings)
        wait_for(lambda: agent.session.stats.sessions_opened > opened, timeout=60)
        assert not agent.session.stats.refused
    finally:
        running.stop()
    # An agent restart loads the renewed identity and connects with it.
    again = start_agent(config)
    try:
        wait_for(lambda: again.agent.session.connected, timeout=30)
        assert again.agent.identity.chain_pem == load_identity(state).chain_pem
    finally:
        again.stop()
        plane.stop()


def test_a_renewal_with_the_control_plane_down_is_retried_until_it_is_back(
    tmp_path: Path, broker: Broker
) -> None:
    cloud_dir = tmp_path / "cloud"
    token = init_plane(cloud_dir).operator_token
    plane = start_plane(cloud_dir, token, presence_flush_interval_s=0.2)
    device_port = plane.plane.device_port
    state = tmp_path / "agent"
    enroll_identity(register(plane, "edge-1"), state)
    config = load_agent_config(
        None,
        {
            "state_dir": state,
            "cloud": {"heartbeat_interval_s": 0.3, "renew_check_s": 0.2},
            "reconnect": {"initial_s": 0.2, "max_s": 0.5},
            "mqtt": {"port": broker.port, "host": "127.0.0.1"},
            "metrics": {"listen": ""},
        },
    )
    plane.stop()  # offline when the renewal falls due
    running = start_agent(config)
    agent = running.agent
    try:
        far = dt.datetime.now(dt.UTC) + dt.timedelta(days=300)
        agent.renewer.clock = lambda: far  # due on every check
        wait_for(lambda: agent.renewer.last_error != "", timeout=30)
        assert agent.renewer.renewals == 0
        plane = start_plane(cloud_dir, token, device_listen=f"127.0.0.1:{device_port}")
        wait_for(lambda: agent.renewer.renewals >= 1, timeout=60)
        agent.renewer.clock = lambda: dt.datetime.now(dt.UTC)
        store = plane.plane.store

        def on_disk() -> str:
            leaf = x509.load_pem_x509_certificates(load_identity(state).chain_pem)[0]
            return certificate_fingerprint(leaf)

        # The last renewal's answer may still be landing: the store and the disk agree then.
        wait_for(lambda: store.get_device("edge-1").cert_fingerprint == on_disk(), timeout=30)
        wait_for(lambda: agent.session.connected, timeout=30)
    finally:
        running.stop()
        plane.stop()


def test_renewal_is_refused_to_a_revoked_device(tmp_path: Path) -> None:
    cloud_dir = tmp_path / "cloud"
    plane = start_plane(cloud_dir, init_plane(cloud_dir).operator_token)
    try:
        state = tmp_path / "agent"
        enroll_identity(register(plane, "edge-1"), state)
        identity = load_identity(state)
        leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
        plane.plane.registry.revoke("edge-1", "stolen")
        csr = build_csr(new_device_key(), identity.info.device_id)
        with pytest.raises(PermissionDenied, match="may not renew"):
            plane.plane.registry.renew(identity.info.device_id, certificate_fingerprint(leaf), csr)
    finally:
        plane.stop()


def test_hostile_renewals_get_clear_errors_and_are_bounded(tmp_path: Path) -> None:
    cloud_dir = tmp_path / "cloud"
    plane = start_plane(cloud_dir, init_plane(cloud_dir).operator_token)
    try:
        state = tmp_path / "agent"
        enroll_identity(register(plane, "edge-1"), state)
        other = tmp_path / "other"
        enroll_identity(register(plane, "edge-2"), other)
        identity = load_identity(state)
        channel = grpc.secure_channel(plane.device_address, identity.credentials())
        stub = agent_pb2_grpc.AgentServiceStub(channel)

        def renew(csr: bytes) -> grpc.RpcError | agent_pb2.RenewCertificateResponse:
            try:
                return stub.RenewCertificate(agent_pb2.RenewCertificateRequest(csr_pem=csr))
            except grpc.RpcError as exc:
                return exc

        garbage = renew(b"-----BEGIN CERTIFICATE REQUEST-----\nnot one\n")
        assert isinstance(garbage, grpc.RpcError)
        assert garbage.code() is grpc.StatusCode.INVALID_ARGUMENT, garbage
        # A CSR naming another device: this device acts only as itself.
        someone = renew(build_csr(new_device_key(), load_identity(other).info.device_id))
        assert isinstance(someone, grpc.RpcError)
        assert someone.code() is grpc.StatusCode.PERMISSION_DENIED, someone
        assert "names" in (someone.details() or "")
        own = build_csr(new_device_key(), identity.info.device_id)
        answers = [renew(own) for _ in range(20)]
        granted = [a for a in answers if isinstance(a, agent_pb2.RenewCertificateResponse)]
        refused = [a for a in answers if isinstance(a, grpc.RpcError)]
        # Every call counts (the two refused above too): a renewal loop is cut off.
        assert len(granted) == RENEWALS_PER_HOUR - 2, len(granted)
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "certificate renewals" in (refused[0].details() or "")
        # The other device is not affected.
        with grpc.secure_channel(plane.device_address, load_identity(other).credentials()) as ch:
            response = agent_pb2_grpc.AgentServiceStub(ch).RenewCertificate(
                agent_pb2.RenewCertificateRequest(
                    csr_pem=build_csr(new_device_key(), load_identity(other).info.device_id)
                )
            )
        assert response.certificate_chain_pem
        channel.close()
    finally:
        plane.stop()
