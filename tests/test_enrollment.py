"""Enrollment end to end over real TLS: the happy path and every refusal."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cloud.pki import CertificateAuthority
from cloud.service.enrollment import MAX_FAILURES, AttemptLimiter, peer_host
from cloud.tokens import ENROLLMENT_PREFIX
from edge_agent.enroll import enroll
from edge_agent.errors import (
    FailedPrecondition,
    LocalStateError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from edge_agent.identity import build_csr, identity_dir, load_identity, new_device_key
from protos.autoglm.v1 import enrollment_pb2, enrollment_pb2_grpc, operator_pb2
from tests.conftest import register
from tests.support.cloud import RunningPlane

pytestmark = pytest.mark.integration


def test_enroll_writes_identity_with_private_key_mode_0600(
    plane: RunningPlane, tmp_path: Path
) -> None:
    bootstrap = register(plane, "pump-1", site="a")
    info = enroll(bootstrap, tmp_path / "agent")
    assert info.device_id == bootstrap.device_id and info.device_name == "pump-1"
    identity = load_identity(tmp_path / "agent")
    key_mode = stat.S_IMODE(os.stat(identity_dir(tmp_path / "agent") / "device.key").st_mode)
    assert key_mode == 0o600
    leaf = x509.load_pem_x509_certificates(identity.chain_pem)[0]
    plane.plane.secrets.ca.verify_issued(leaf)
    assert identity.signing_public_pem == plane.plane.secrets.signing_public_pem
    with plane.client() as client:
        device = client.get_device("pump-1")
    assert device.state == operator_pb2.Device.STATE_ACTIVE


def test_token_is_single_use(plane: RunningPlane, tmp_path: Path) -> None:
    bootstrap = register(plane, "pump-1")
    enroll(bootstrap, tmp_path / "a")
    with pytest.raises(Unauthenticated, match="used already"):
        enroll(bootstrap, tmp_path / "b")
    assert not identity_dir(tmp_path / "b").exists()


def test_unknown_token_is_refused(plane: RunningPlane, tmp_path: Path) -> None:
    bootstrap = register(plane, "pump-1").model_copy(update={"token": "agt_enr_made-up-token"})
    with pytest.raises(Unauthenticated, match="unknown"):
        enroll(bootstrap, tmp_path / "a")


def test_expired_token_is_refused_by_the_server(plane: RunningPlane, tmp_path: Path) -> None:
    with plane.client() as client:
        response = client.register_device(
            operator_pb2.RegisterDeviceRequest(name="pump-1", token_ttl_seconds=1)
        )
    bootstrap = register(plane, "other").model_copy(
        update={
            "device_id": response.device.id,
            "token": response.enrollment_token,
            # the agent's own expiry check is bypassed to reach the server's
            "expires_at": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        }
    )
    import time

    time.sleep(1.2)
    with pytest.raises(Unauthenticated, match="expired"):
        enroll(bootstrap, tmp_path / "a")


def test_expired_bootstrap_is_refused_locally(plane: RunningPlane, tmp_path: Path) -> None:
    bootstrap = register(plane, "pump-1").model_copy(
        update={"expires_at": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)}
    )
    with pytest.raises(FailedPrecondition, match="expired"):
        enroll(bootstrap, tmp_path / "a")


def test_csr_naming_another_device_is_refused(plane: RunningPlane) -> None:
    bootstrap = register(plane, "pump-1")
    victim = register(plane, "pump-2")
    key = new_device_key()
    request = enrollment_pb2.EnrollRequest(
        token=bootstrap.token, csr_pem=build_csr(key, victim.device_id)
    )
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Enroll(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert victim.device_id in (err.value.details() or "")
        # the refusal did not spend the token: the honest CSR still enrolls
        ok = stub.Enroll(
            enrollment_pb2.EnrollRequest(
                token=bootstrap.token, csr_pem=build_csr(key, bootstrap.device_id)
            ),
            timeout=10,
        )
        assert ok.device_id == bootstrap.device_id


def test_wrong_ca_in_bootstrap_fails_the_handshake(plane: RunningPlane, tmp_path: Path) -> None:
    other_ca = CertificateAuthority.create("Someone else's CA")
    bootstrap = register(plane, "pump-1").model_copy(
        update={"ca_certificate": other_ca.cert_pem.decode()}
    )
    with pytest.raises(Unavailable, match="not signed by the CA you trust"):
        enroll(bootstrap, tmp_path / "a")
    assert not identity_dir(tmp_path / "a").exists()


def test_unwritable_state_dir_fails_before_spending_the_token(
    plane: RunningPlane, tmp_path: Path
) -> None:
    bootstrap = register(plane, "pump-1")
    locked = tmp_path / "locked"
    locked.mkdir()
    blocker = locked / "state"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(LocalStateError, match="not writable"):
        enroll(bootstrap, blocker)
    enroll(bootstrap, tmp_path / "good")  # the token still works


def test_enrolling_twice_into_one_state_dir_is_refused(plane: RunningPlane, tmp_path: Path) -> None:
    enroll(register(plane, "pump-1"), tmp_path / "a")
    before = (identity_dir(tmp_path / "a") / "device.key").read_bytes()
    with pytest.raises(FailedPrecondition, match="enrolled identity already"):
        enroll(register(plane, "pump-2"), tmp_path / "a")
    assert (identity_dir(tmp_path / "a") / "device.key").read_bytes() == before


def test_revoked_device_cannot_enroll(plane: RunningPlane, tmp_path: Path) -> None:
    bootstrap = register(plane, "pump-1")
    with plane.client() as client:
        client.revoke_device("pump-1", "lost in transit")
    with pytest.raises(Unauthenticated):
        enroll(bootstrap, tmp_path / "a")


def test_malformed_csr_is_invalid_argument(plane: RunningPlane) -> None:
    bootstrap = register(plane, "pump-1")
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Enroll(
                enrollment_pb2.EnrollRequest(token=bootstrap.token, csr_pem=b"junk"), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_permission_denied_class_for_csr_mismatch() -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(PermissionDenied):
        ca.sign_device_csr(build_csr(new_device_key(), "someone"), "me", 30)


def test_a_new_token_replaces_an_expired_one(plane: RunningPlane, tmp_path: Path) -> None:
    from cloud.service.serde import bootstrap_from_registration

    with plane.client() as client:
        first = client.register_device(
            operator_pb2.RegisterDeviceRequest(name="pump-1", token_ttl_seconds=1)
        )
        import time

        time.sleep(1.1)
        with pytest.raises(FailedPrecondition, match="expired"):
            enroll(bootstrap_from_registration(first), tmp_path / "a")
        second = client.issue_enrollment_token("pump-1", token_ttl_seconds=600)
    assert second.device.id == first.device.id
    assert second.enrollment_token != first.enrollment_token
    info = enroll(bootstrap_from_registration(second), tmp_path / "a")
    assert info.device_id == first.device.id


def _enroll_call(plane: RunningPlane, token: str, csr_pem: bytes) -> grpc.RpcError | None:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    with grpc.secure_channel(plane.api_address, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        try:
            stub.Enroll(enrollment_pb2.EnrollRequest(token=token, csr_pem=csr_pem), timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def test_a_key_on_another_curve_is_refused_before_the_token_is_spent(
    plane: RunningPlane,
) -> None:
    bootstrap = register(plane, "pump-1")
    p384 = ec.generate_private_key(ec.SECP384R1())
    refused = _enroll_call(plane, bootstrap.token, build_csr(p384, bootstrap.device_id))  # type: ignore[arg-type]
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EC P-256 or Ed25519" in (refused.details() or "") and "secp384r1" in (
        refused.details() or ""
    )
    assert (
        _enroll_call(plane, bootstrap.token, build_csr(new_device_key(), bootstrap.device_id))
        is None
    )


def test_token_guesses_are_throttled_per_peer(plane: RunningPlane) -> None:
    bootstrap = register(plane, "pump-1")
    csr = build_csr(new_device_key(), bootstrap.device_id)
    for i in range(MAX_FAILURES):
        wrong = _enroll_call(plane, f"{ENROLLMENT_PREFIX}guess-{i}", csr)
        assert wrong is not None and wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    # Past the limit even the right token waits for the window to end.
    throttled = _enroll_call(plane, bootstrap.token, csr)
    assert throttled is not None and throttled.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "failed enrollment attempts" in (throttled.details() or "")


def test_the_attempt_window_ends() -> None:
    now = [0.0]
    limiter = AttemptLimiter(max_failures=2, window_s=60, clock=lambda: now[0])
    limiter.failed("ipv4:10.0.0.7")
    limiter.failed("ipv4:10.0.0.7")
    with pytest.raises(RateLimited, match="try again in 60 s"):
        limiter.check("ipv4:10.0.0.7")
    limiter.check("ipv4:10.0.0.8")  # another peer is not held up
    now[0] = 61.0
    limiter.check("ipv4:10.0.0.7")
    assert peer_host("ipv4:10.0.0.7:52344") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:52344") == "ipv6:[::1]"


def test_a_device_clock_outside_its_certificates_is_named_as_the_cause(
    plane: RunningPlane, tmp_path: Path
) -> None:
    enroll(register(plane, "pump-1"), tmp_path / "agent")
    identity = load_identity(tmp_path / "agent")
    now = dt.datetime.now(dt.UTC)
    assert identity.clock_problem(now) == ""
    behind = identity.clock_problem(now - dt.timedelta(hours=1))
    assert "this device's clock says" in behind and "set the clock (NTP)" in behind, behind
    assert "outside the validity" in identity.clock_problem(now + dt.timedelta(days=4000))
