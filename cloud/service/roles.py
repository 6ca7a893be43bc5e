"""Operator roles, what each may call, and what the audit log records of a call.

- `viewer` reads: devices, predictions, models (pulling a bundle too), rollouts, alerts,
  captured windows (retraining data: raw sensor values, so not for the public).
- `operator` also runs the fleet day to day: registers and labels devices, issues enrollment
  tokens, pushes models, runs rollouts, acknowledges and resolves alerts.
- `admin` also revokes and deletes devices and models, manages webhooks and operators, and
  reads the audit log.

Every OperatorService method is named here (a test checks it): a new RPC needs a decision.
Every call that is not a read is written to the audit log, refused ones included.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edge_agent.errors import InvalidInput, PermissionDenied

ROLES = ("viewer", "operator", "admin")
READS = frozenset(
    {
        "ListDevices",
        "GetDevice",
        "QueryPredictions",
        "ListModels",
        "GetModel",
        "GetRollout",
        "ListRollouts",
        "ListAlerts",
        "GetAlert",
        "WatchAlerts",
        "ListWebhooks",
        "ListOperators",
        "ListAudit",
        "ListMaintenance",
        "PullBundle",
        "ListCaptures",
        "ListEnrollmentGroups",
    }
)
LEAST_ROLE: dict[str, str] = {
    **{
        m: "viewer"
        for m in READS - {"ListWebhooks", "ListOperators", "ListAudit", "ListEnrollmentGroups"}
    },
    **{
        m: "operator"
        for m in (
            "RegisterDevice",
            "IssueEnrollmentToken",
            "LabelDevice",
            "PushBundle",
            "CreateRollout",
            "PauseRollout",
            "ResumeRollout",
            "AbortRollout",
            "UndoRollout",
            "AckAlert",
            "ResolveAlert",
            "ShelveAlert",
            "UnshelveAlert",
            "AddMaintenance",
            "RemoveMaintenance",
        )
    },
    **{
        m: "admin"
        for m in (
            "RevokeDevice",
            "DeleteDevice",
            "CreateEnrollmentGroup",
            "ListEnrollmentGroups",
            "RevokeEnrollmentGroup",
            "DeleteModel",
            "AddWebhook",
            "ListWebhooks",
            "RemoveWebhook",
            "RotateWebhookSecret",
            "AddOperator",
            "ListOperators",
            "RevokeOperator",
            "ListAudit",
        )
    },
}
SECRET_FIELDS = ("secret", "token", "url", "password")  # never written to the audit log
TARGET_CHARS = 500


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidInput(f"role '{role}' is not one of {', '.join(ROLES)}")
    return role


def authorize(role: str, method: str) -> None:
    """PermissionDenied unless `role` may call `method` (unknown methods: admin only)."""
    needed = LEAST_ROLE.get(method, "admin")
    rank = ROLES.index(role) if role in ROLES else -1
    if rank < ROLES.index(needed):
        raise PermissionDenied(
            f"{method} needs the {needed} role; this operator is a {role or 'role-less'} "
            "(an admin can add an operator with that role: autoglm operator add NAME --role "
            f"{needed})"
        )


def audited(method: str) -> bool:
    return method not in READS


def target_of(request: Message | None) -> str:
    """What a call was about, for the audit log: its scalar and map fields, secrets left
    out (webhook URLs and secrets, tokens)."""
    if request is None:
        return ""
    parts = []
    for field, value in request.ListFields():
        if any(word in field.name for word in SECRET_FIELDS):
            parts.append(f"{field.name}=<redacted>")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry is not None and entry.GetOptions().map_entry:
                parts.append(f"{field.name}={dict(sorted(value.items()))}")
            continue  # nested messages: not needed to tell what the call was about
        elif field.is_repeated:
            parts.append(f"{field.name}={list(value)}")
        elif field.type == FieldDescriptor.TYPE_BYTES:
            parts.append(f"{field.name}=<{len(value)} bytes>")
        else:
            parts.append(f"{field.name}={value}")
    text = " ".join(parts)
    return text if len(text) <= TARGET_CHARS else text[: TARGET_CHARS - 3] + "..."
