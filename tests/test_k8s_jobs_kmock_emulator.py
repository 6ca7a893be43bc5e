"""`--executor kubernetes` against the kmock Kubernetes API emulator (no cluster can run
here): the real CLI creates the Job through the official client, follows it to success or
failure as the test plays the Job controller, prints the pod's log and cleans up."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloud.cli.main import run
from tests.support.kube_emulator import KubeEmulator, kube_emulator

pytestmark = pytest.mark.integration
IMAGE = "registry.example/autoglm:0.1.0"


@pytest.fixture
def emulator() -> Any:
    with kube_emulator() as e:
        yield e


def play_controller(emulator: KubeEmulator, succeeded: bool, log: str) -> dict[str, Any]:
    """Waits for the CLI's Job, then finishes it; returns the Job as created."""
    seen: dict[str, Any] = {}

    def act() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            jobs = emulator.jobs("ml")
            if jobs:
                name, job = next(iter(jobs.items()))
                seen.update(job)
                time.sleep(0.3)  # the CLI sees it pending first
                emulator.finish_job("ml", name, succeeded, log)
                return
            time.sleep(0.05)

    threading.Thread(target=act, daemon=True).start()
    return seen


def train_argv(kubeconfig: Path, *extra: str) -> list[str]:
    return [
        "model", "train", "--data", "/data/skab/valve1", "--out", "/artifacts/pump-7",
        "--name", "pump", "--epochs", "20", "--signing-key", "/nonexistent/key.pem",
        "--executor", "kubernetes", "--image", IMAGE, "--namespace", "ml", "--gpus", "1",
        "--node-selector", "nvidia.com/gpu.product=A100", "--data-claim", "plant-data",
        "--artifacts-claim", "bundles", "--push-secret", "autoglm-push",
        "--kubeconfig", str(kubeconfig), "--job-timeout", "30", *extra,
    ]  # fmt: skip


def test_a_training_job_is_created_followed_to_success_and_removed(
    emulator: KubeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
    job = play_controller(emulator, True, "epoch 20/20 loss 0.21\npushed pump:7\n")
    argv = train_argv(kubeconfig)
    monkeypatch.setattr("sys.argv", ["autoglm", *argv])
    assert run(argv) == 0
    out = capsys.readouterr()
    assert "succeeded and pushed the bundle" in out.out
    assert "pushed pump:7" in out.err and "1 succeeded" in out.err
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert {v["name"]: v for v in spec["volumes"]}["data"]["persistentVolumeClaim"] == {
        "claimName": "plant-data",
        "readOnly": True,
    }
    shell = container["command"][2]
    assert shell.startswith("autoglm model train --data /data/skab/valve1 --out /artifacts/pump-7")
    assert shell.endswith("&& autoglm model push /artifacts/pump-7")
    for flag in ("--executor", "--image", "--kubeconfig", "--signing-key", "--push-secret"):
        assert flag not in shell  # steering flags stay outside; the key comes from the Secret
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AUTOGLM_SIGNING_KEY"] == "/etc/autoglm-push/signing.key"
    assert job["spec"]["backoffLimit"] == 0
    assert emulator.jobs("ml") == {}  # cleaned up


def test_a_failed_job_says_why_with_its_log_and_is_removed(
    emulator: KubeEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
    play_controller(emulator, False, "Traceback ...\nInvalidInput: /data/x: no such file\n")
    argv = train_argv(kubeconfig)
    monkeypatch.setattr("sys.argv", ["autoglm", *argv])
    assert run(argv) != 0
    err = capsys.readouterr().err
    assert "BackoffLimitExceeded" in err and "/data/x: no such file" in err
    assert emulator.jobs("ml") == {}


def test_engine_builds_run_on_the_target_device_class(
    emulator: KubeEmulator, tmp_path: Path, monkeypatch: Any
) -> None:
    kubeconfig = emulator.kubeconfig(tmp_path / "kubeconfig")
    job = play_controller(emulator, True, "built engines for jetson-orin-nx\n")
    argv = [
        "model", "build-engines", "/artifacts/pump-7", "--profile", "jetson-orin-nx",
        "--executor", "kubernetes", "--image", IMAGE, "--namespace", "ml", "--keep-job",
        "--kubeconfig", str(kubeconfig), "--job-timeout", "30",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["autoglm", *argv])
    assert run(argv) == 0
    spec = job["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"autoglm.io/device-profile": "jetson-orin-nx"}
    assert spec["containers"][0]["command"] == [
        "autoglm", "model", "build-engines", "/artifacts/pump-7", "--profile", "jetson-orin-nx",
    ]  # fmt: skip
    assert list(emulator.jobs("ml")) == [job["metadata"]["name"]]  # --keep-job


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "registry.example/autoglm:latest"], "pin a version"),
        (["--image", "registry.example/autoglm"], "tag or digest"),
        (["--job-name", "Bad_Name"], "job name"),
        (["--node-selector", "novalue"], "--node-selector"),
    ],
)
def test_bad_job_arguments_are_clear_errors(
    emulator: KubeEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    extra: list[str],
    message: str,
) -> None:
    argv = train_argv(emulator.kubeconfig(tmp_path / "kubeconfig"), *extra)
    monkeypatch.setattr("sys.argv", ["autoglm", *argv])
    assert run(argv) != 0
    assert message in capsys.readouterr().err
    assert emulator.jobs("ml") == {}


def test_leader_election_through_a_lease_on_the_emulator() -> None:
    from kubernetes import client

    from cloud.leader import LEASE_NAME, KubernetesLease

    with kube_emulator(extra_resources=["coordination.k8s.io/v1/leases"]) as emulator:
        api = client.CoordinationV1Api(client.ApiClient(client.Configuration(host=emulator.url)))
        a = KubernetesLease("autoglm", "replica-a", 15, api=api)
        b = KubernetesLease("autoglm", "replica-b", 15, api=api)
        assert a._attempt() is True  # creates the Lease
        assert b._attempt() is False  # held and fresh
        assert a._attempt() is True  # renews
        lease = api.read_namespaced_lease(LEASE_NAME, "autoglm")
        assert lease.spec.holder_identity == "replica-a"
        a._release()  # a graceful stop: the lease is left expired
        assert b._attempt() is True
        taken = api.read_namespaced_lease(LEASE_NAME, "autoglm")
        assert taken.spec.holder_identity == "replica-b" and taken.spec.lease_transitions == 1
