"""The cloud's domain stays apart from the wire: only the service layer (`cloud/service/`),
and the client side (`cloud/client.py`, the CLI, the demo, the web console, which drive the
API) speak protobuf or gRPC. Domain modules take and return domain types; serde lives in
`cloud/service/serde.py` and `cloud/service/records.py`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cloud.domain import InstallOutcome, InstallReport, ShadowReport
from cloud.service.serde import (
    install_report_from_proto,
    install_report_to_proto,
    shadow_report_from_proto,
    shadow_report_to_proto,
)
from protos.autoglm.v1 import agent_pb2

pytestmark = pytest.mark.unit
CLOUD = Path(__file__).resolve().parents[1] / "cloud"
WIRE_SIDE = ("service/", "client.py", "cli/", "demo.py", "console/")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_domain_modules_import_no_protobuf_or_grpc() -> None:
    offenders = {}
    for path in sorted(CLOUD.rglob("*.py")):
        relative = path.relative_to(CLOUD).as_posix()
        if relative.startswith(WIRE_SIDE):
            continue
        wire = sorted(
            name
            for name in _imports(path)
            if name == "grpc" or name.startswith(("grpc.", "protos.")) or name.endswith("_pb2")
        )
        if wire:
            offenders[relative] = wire
    assert offenders == {}, offenders


def test_domain_modules_do_not_reach_into_the_service_layer() -> None:
    for path in sorted(CLOUD.rglob("*.py")):
        relative = path.relative_to(CLOUD).as_posix()
        if relative.startswith(WIRE_SIDE):
            continue
        assert not any(n.startswith("cloud.service") for n in _imports(path)), relative


@pytest.mark.parametrize("retrying", [False, True])
@pytest.mark.parametrize("outcome", list(InstallOutcome))
def test_install_reports_round_trip(outcome: InstallOutcome, retrying: bool) -> None:
    report = InstallReport(
        "r-1", "2", outcome, "golden mismatch", "onnxruntime", "pump", "1", retrying
    )
    assert install_report_from_proto(install_report_to_proto(report)) == report


def test_an_outcome_from_a_newer_agent_is_unknown_not_an_error() -> None:
    wire = agent_pb2.InstallReport(rollout_id="r-1", model_version="2")
    wire.outcome = 99  # type: ignore[assignment]
    assert install_report_from_proto(wire).outcome is InstallOutcome.UNKNOWN


def test_shadow_reports_round_trip() -> None:
    report = ShadowReport("r-1", "2", 40, 0.975, 0.05, 0.025, 3.5, 2.0, "")
    assert shadow_report_from_proto(shadow_report_to_proto(report)) == report
