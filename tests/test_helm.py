"""The Helm charts render with every values file under `ci/`, every rendered object validates
against the Kubernetes schemas of 1.29-1.31, the output passes yamllint, and values mistakes
fail with a clear message. Rendering uses Helm's own Go SDK (helm-python-sdk), no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

pytestmark = pytest.mark.unit
HELM = Path(__file__).resolve().parents[1] / "helm"
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0")
CASES = [
    (chart.name, values)
    for chart in sorted(p for p in HELM.iterdir() if (p / "Chart.yaml").exists())
    for values in sorted((chart / "ci").glob("*.yaml"))
]
LINT = YamlLintConfig(
    "extends: default\nrules:\n  line-length: {max: 200}\n  document-start: disable\n"
)


def render(chart: str, values: dict[str, Any]) -> dict[str, str]:
    loaded = helm.Chart.load(HELM / chart)
    loaded.validate_schema(values)
    return loaded.render(values, name="autoglm", namespace="autoglm", is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    return [
        doc
        for text in rendered.values()
        for doc in yaml.safe_load_all(text)
        if doc  # templates that render nothing for these values
    ]


@pytest.mark.parametrize(("chart", "values_file"), CASES, ids=[f"{c}-{v.stem}" for c, v in CASES])
def test_renders_and_validates(chart: str, values_file: Path) -> None:
    rendered = render(chart, yaml.safe_load(values_file.read_text()))
    docs = objects(rendered)
    kinds = {d["kind"] for d in docs}
    assert ("Deployment" in kinds) if chart == "autoglm-cloud" else ("DaemonSet" in kinds)
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    for path, text in rendered.items():
        if not text.strip():
            continue  # a template that renders nothing for these values
        problems = list(linter.run(text, LINT))
        assert not problems, f"{path}: {[str(p) for p in problems]}"


def test_the_cloud_chart_wires_probes_secrets_and_leader_election() -> None:
    values = yaml.safe_load((HELM / "autoglm-cloud/ci/inline-secrets.yaml").read_text())
    docs = {(d["kind"], d["metadata"]["name"]): d for d in objects(render("autoglm-cloud", values))}
    deployment = docs[("Deployment", "autoglm-autoglm-cloud")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == 7445
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    config = yaml.safe_load(docs[("ConfigMap", "autoglm-autoglm-cloud")]["data"]["cloud.yaml"])
    assert config["leader_election"] == "kubernetes" and config["health_listen"].endswith(":7445")
    assert config["hosts"] == ["autoglm.plant-a.example", "10.0.0.5"]
    role = docs[("Role", "autoglm-autoglm-cloud-leader")]
    assert role["rules"][0]["resources"] == ["leases"]
    assert set(docs[("Secret", "autoglm-autoglm-cloud-keys")]["data"]) == {
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "signing.key",
    }


def test_the_edge_chart_selects_nodes_by_device_profile() -> None:
    values = yaml.safe_load((HELM / "autoglm-edge/ci/orin-nano-two-assets.yaml").read_text())
    docs = objects(render("autoglm-edge", values))
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"autoglm.io/device-profile": "jetson-orin-nano"}
    assert spec["hostNetwork"] is True and spec["volumes"][0]["hostPath"]["path"]
    agent = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["agent.yaml"])
    assert [a["name"] for a in agent["assets"]] == ["pump-1", "pump-2"]
    assert agent["model"]["profile"] == "jetson-orin-nano"


@pytest.mark.parametrize(
    ("chart", "values", "message"),
    [
        ("autoglm-cloud", {"replicaCount": "two"}, "replicaCount"),
        ("autoglm-cloud", {"image": {"repository": "x", "tag": "latest"}}, "tag"),
        ("autoglm-cloud", {"database": {"url": "mysql://x"}}, "url"),
        (
            "autoglm-cloud",
            {"database": {"url": "postgresql://h/db"}},
            "secrets.caCert is required",
        ),
        (
            "autoglm-cloud",
            {"secrets": {"existingSecret": "keys"}},
            "database.url or database.existingSecret is required",
        ),
        ("autoglm-edge", {"mqtt": {"host": "h", "port": 99999}}, "port"),
        ("autoglm-edge", {"assets": []}, "assets"),
        ("autoglm-edge", {"stateHostPath": "relative/path"}, "stateHostPath"),
    ],
)
def test_values_mistakes_fail_with_a_clear_message(
    chart: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(chart, values)


def test_grafana_dashboards_render_as_labelled_configmaps() -> None:
    values = yaml.safe_load((HELM / "autoglm-cloud/ci/single-no-persistence.yaml").read_text())
    maps = [
        d
        for d in objects(render("autoglm-cloud", values))
        if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]
    ]
    assert sorted(m["metadata"]["name"].rsplit("-", 1)[-1] for m in maps) == [
        "alerts",
        "fleet",
        "rollouts",
    ]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = m["data"].values()
        dashboard = json.loads(text)
        assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])


def test_the_console_is_off_by_default_and_wired_when_enabled() -> None:
    values = yaml.safe_load((HELM / "autoglm-cloud/ci/inline-secrets.yaml").read_text())
    for enabled in (False, True):
        docs = {
            (d["kind"], d["metadata"]["name"]): d
            for d in objects(render("autoglm-cloud", values | {"console": {"enabled": enabled}}))
        }
        config = yaml.safe_load(docs[("ConfigMap", "autoglm-autoglm-cloud")]["data"]["cloud.yaml"])
        container = docs[("Deployment", "autoglm-autoglm-cloud")]["spec"]["template"]["spec"][
            "containers"
        ][0]
        service_ports = docs[("Service", "autoglm-autoglm-cloud")]["spec"]["ports"]
        policy = docs[("NetworkPolicy", "autoglm-autoglm-cloud")]["spec"]["ingress"]
        policy_ports = [p["port"] for rule in policy for p in rule["ports"]]
        if enabled:
            assert config["console_listen"] == "0.0.0.0:8080"
            assert {"name": "console", "containerPort": 8080, "protocol": "TCP"} in container[
                "ports"
            ]
            assert any(p["name"] == "console" and p["port"] == 8080 for p in service_ports)
            assert 8080 in policy_ports
        else:
            assert "console_listen" not in config
            assert all(p["name"] != "console" for p in container["ports"] + service_ports)
            assert 8080 not in policy_ports
