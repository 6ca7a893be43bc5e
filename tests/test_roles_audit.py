"""Operators with roles (viewer < operator < admin), enforced per RPC over the real API, and the
audit log of every mutating call, refused ones included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from cloud.service.guard import RefusedBudget
from cloud.service.roles import LEAST_ROLE, READS, ROLES
from cloud.webhook_kinds import new_secret
from edge_agent.errors import FailedPrecondition, PermissionDenied
from protos.autoglm.v1 import operator_pb2
from tests.support.agents import wait_for
from tests.support.cloud import RunningPlane

pytestmark = [pytest.mark.integration]
OPERATOR = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]


def _message_class(descriptor: Descriptor) -> Any:
    return message_factory.GetMessageClass(descriptor)


def _call(plane: RunningPlane, token: str, method: str) -> grpc.StatusCode:
    """An empty request to `method` with `token`: the status it gets."""
    descriptor = OPERATOR.methods_by_name[method]
    request: Message = _message_class(descriptor.input_type)()
    response_cls = _message_class(descriptor.output_type)
    path = f"/{OPERATOR.full_name}/{method}"
    metadata = (("authorization", f"Bearer {token}"),)
    credentials = grpc.ssl_channel_credentials(root_certificates=plane.ca_pem)
    kw: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_cls.FromString,
    }
    with grpc.secure_channel(plane.api_address, credentials) as channel:
        try:
            if descriptor.client_streaming:
                channel.stream_unary(path, **kw)(iter([request]), metadata=metadata, timeout=10)
            elif descriptor.server_streaming:
                for _ in channel.unary_stream(path, **kw)(request, metadata=metadata, timeout=5):
                    break
            else:
                channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_every_operator_rpc_has_a_role_decided() -> None:
    assert set(LEAST_ROLE) == set(OPERATOR.methods_by_name)
    assert set(LEAST_ROLE) >= READS


def test_roles_are_enforced_per_rpc_and_every_mutating_call_is_audited(
    plane: RunningPlane,
) -> None:
    tokens = {"admin": plane.token}
    with plane.client() as admin:
        for role in ("viewer", "operator"):
            tokens[role] = admin.add_operator(f"{role}-1", role).token
    wrong: list[str] = []
    for method in sorted(LEAST_ROLE):
        if method in ("RevokeOperator", "AddOperator"):
            continue  # below, with their own checks (an empty name is refused anyway)
        for role in ROLES:
            code = _call(plane, tokens[role], method)
            allowed = ROLES.index(role) >= ROLES.index(LEAST_ROLE[method])
            denied = code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
            if allowed == denied:
                wrong.append(f"{method} as {role}: {code.name}")
    assert not wrong, wrong

    with plane.client() as admin:
        entries = admin.list_audit(limit=1000)
    audited = {(e.operator, e.method, e.code) for e in entries}
    # A refused mutating call is recorded with its code; reads are not recorded at all.
    assert ("viewer-1", "CreateRollout", "PERMISSION_DENIED") in audited
    assert ("operator-1", "RevokeDevice", "PERMISSION_DENIED") in audited
    assert any(op == "admin" and m == "CreateRollout" for op, m, _ in audited)
    assert not {m for _, m, _ in audited} & READS
    viewer_entry = next(e for e in entries if e.operator == "viewer-1")
    assert viewer_entry.role == "viewer" and viewer_entry.at.seconds > 0


def test_operators_are_added_listed_and_revoked_and_secrets_stay_out_of_the_audit(
    plane: RunningPlane,
) -> None:
    with plane.client() as admin:
        added = admin.add_operator("ci-bot", "operator")
        assert added.operator.role == "operator" and added.token.startswith("agt_op_")
        with pytest.raises(Exception, match="role 'root'"):
            admin.add_operator("x", "root")
        names = {o.name: o.role for o in admin.list_operators()}
        assert names == {"admin": "admin", "ci-bot": "operator"}
        with plane.client(token=added.token) as bot:
            assert bot.list_devices() == []
            with pytest.raises(PermissionDenied, match="needs the admin role"):
                bot.list_operators()
        secret = new_secret()
        admin.add_webhook("https://hooks.example/x?key=abc123", secret)
        with pytest.raises(FailedPrecondition, match="last admin"):
            admin.revoke_operator("admin")
        revoked = admin.revoke_operator("ci-bot")
        assert revoked.HasField("revoked_at")

        def refused() -> bool:
            try:
                with plane.client(token=added.token) as bot:
                    bot.list_devices()
            except Exception as exc:  # noqa: BLE001 - the kind is checked below
                return "not valid" in str(exc)
            return False

        wait_for(refused, timeout=15)  # good tokens are cached for a few seconds
        entries = admin.list_audit(limit=100)
    webhook = next(e for e in entries if e.method == "AddWebhook")
    assert secret not in webhook.target and "abc123" not in webhook.target, webhook.target
    assert "<redacted>" in webhook.target
    revoke = [e for e in entries if e.method == "RevokeOperator"]
    assert [e.code for e in revoke] == ["OK", "FAILED_PRECONDITION"]  # newest first
    assert "name=ci-bot" in revoke[0].target


def test_the_cli_manages_operators_and_reads_the_audit_log(
    plane: RunningPlane, tmp_path: Path
) -> None:
    def autoglm(*args: str) -> str:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "autoglm"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "AUTOGLM_SERVER": plane.api_address,
                "AUTOGLM_TOKEN": plane.token,
                "AUTOGLM_CA_CERT": str(plane.config.state_dir / "ca.crt"),
                "HOME": str(tmp_path),
                "PATH": "/usr/bin:/bin",
            },
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = autoglm("operator", "add", "alice", "--role", "viewer")
    assert "token (shown once): agt_op_" in out
    assert "alice" in autoglm("operator", "list")
    log = autoglm("audit", "list", "--since", "1h")
    assert "AddOperator" in log and "admin" in log and "name=alice" in log


def test_refused_calls_cannot_flood_the_audit_log() -> None:
    budget = RefusedBudget(per_minute=3)
    assert [budget.allows("viewer-1") for _ in range(5)] == [True, True, True, False, False]
    assert budget.allows("someone-else")  # per operator
