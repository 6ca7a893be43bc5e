"""Training and engine builds as Kubernetes Jobs (batch/v1), through the official client.

`autoglm model train ... --executor kubernetes --image IMG` and `model build-engines ...
--executor kubernetes` create a Job that runs the same `autoglm model ...` command in the
image, on a GPU node of the wanted device class, with the data and artifacts volumes
mounted, then push the bundle to the control plane with the credentials in a Secret. The
CLI follows the Job's status to success or failure, prints its pod's log, and removes the
Job (and its pods) unless asked to keep it.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PUSH_DIR = "/etc/autoglm-push"


@dataclass(frozen=True)
class JobSpec:
    name: str
    image: str
    command: list[str]  # argv inside the container (`autoglm ...`, or `sh -c ...`)
    namespace: str = "default"
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    data_claim: str = ""  # PVC mounted read-only at /data
    artifacts_claim: str = ""  # PVC mounted at /artifacts
    push_secret: str = ""  # Secret with AUTOGLM_SERVER, AUTOGLM_TOKEN and ca.crt
    service_account: str = ""
    deadline_s: int = 6 * 3600

    def __post_init__(self) -> None:
        if not NAME.match(self.name) or len(self.name) > 52:
            raise InvalidInput(
                f"job name {self.name!r}: lower-case letters, digits and '-', at most 52"
            )
        if ":" not in self.image.rsplit("/", 1)[-1] and "@" not in self.image:
            raise InvalidInput(f"--image {self.image!r}: give a tag or digest (no implicit latest)")
        if self.image.endswith(":latest"):
            raise InvalidInput(f"--image {self.image!r}: pin a version, not latest")
        if self.gpus < 0:
            raise InvalidInput("--gpus must be >= 0")


@dataclass(frozen=True)
class JobResult:
    name: str
    succeeded: bool
    reason: str
    log: str


def job_body(spec: JobSpec) -> Any:
    """The batch/v1 Job for `spec` (a kubernetes.client.V1Job)."""
    from kubernetes import client

    mounts, volumes = [], []
    if spec.data_claim:
        mounts.append(client.V1VolumeMount(name="data", mount_path="/data", read_only=True))
        volumes.append(
            client.V1Volume(
                name="data",
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                    claim_name=spec.data_claim, read_only=True
                ),
            )
        )
    if spec.artifacts_claim:
        mounts.append(client.V1VolumeMount(name="artifacts", mount_path="/artifacts"))
        volumes.append(
            client.V1Volume(
                name="artifacts",
                persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                    claim_name=spec.artifacts_claim
                ),
            )
        )
    env_from, env = [], []
    if spec.push_secret:  # AUTOGLM_SERVER and AUTOGLM_TOKEN; ca.crt and signing.key as files
        env_from.append(
            client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=spec.push_secret))
        )
        mounts.append(client.V1VolumeMount(name="push", mount_path=PUSH_DIR, read_only=True))
        volumes.append(
            client.V1Volume(
                name="push", secret=client.V1SecretVolumeSource(secret_name=spec.push_secret)
            )
        )
        env += [
            client.V1EnvVar(name="AUTOGLM_CA_CERT", value=f"{PUSH_DIR}/ca.crt"),
            client.V1EnvVar(name="AUTOGLM_SIGNING_KEY", value=f"{PUSH_DIR}/signing.key"),
        ]
    limits = {"nvidia.com/gpu": str(spec.gpus)} if spec.gpus else None
    container = client.V1Container(
        name="autoglm",
        image=spec.image,
        command=spec.command,
        env=env or None,
        env_from=env_from or None,
        volume_mounts=mounts or None,
        resources=client.V1ResourceRequirements(limits=limits) if limits else None,
        security_context=client.V1SecurityContext(
            allow_privilege_escalation=False, run_as_non_root=True, run_as_user=10001
        ),
    )
    labels = {"app.kubernetes.io/name": "autoglm-job", "autoglm.io/job": spec.name}
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=spec.name, namespace=spec.namespace, labels=labels),
        spec=client.V1JobSpec(
            backoff_limit=0,  # a failed training is reported, not retried blindly
            active_deadline_seconds=spec.deadline_s,
            ttl_seconds_after_finished=24 * 3600,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    volumes=volumes or None,
                    node_selector=spec.node_selector or None,
                    service_account_name=spec.service_account or None,
                ),
            ),
        ),
    )


class JobExecutor:
    """Creates, follows and removes Jobs; `api_client` is a kubernetes.client.ApiClient."""

    def __init__(self, api_client: Any, clock: Callable[[], float] = time.monotonic) -> None:
        from kubernetes import client

        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.clock = clock

    def submit(self, spec: JobSpec) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.create_namespaced_job(spec.namespace, job_body(spec))
        except ApiException as exc:
            if exc.status == 409:
                raise FailedPrecondition(
                    f"a Job named {spec.name} exists in {spec.namespace}; pick another name"
                ) from None
            raise Unavailable(f"cannot create the Job: HTTP {exc.status} {exc.reason}") from None
        return spec.name

    def follow(
        self,
        name: str,
        namespace: str,
        timeout_s: float,
        poll_s: float = 2.0,
        on_status: Callable[[str], None] = lambda _: None,
    ) -> JobResult:
        """Polls the Job until it succeeds or fails (or `timeout_s`); its pod's log."""
        from kubernetes.client.exceptions import ApiException

        deadline = self.clock() + timeout_s
        last = ""
        while True:
            try:
                job = self.batch.read_namespaced_job_status(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    raise NotFound(f"Job {namespace}/{name} is gone") from None
                raise Unavailable(f"cannot read Job {name}: HTTP {exc.status}") from None
            status = job.status
            state = _describe(status)
            if state != last:
                on_status(state)
                last = state
            if status is not None and (status.succeeded or 0) > 0:
                return JobResult(name, True, "succeeded", self.log(name, namespace))
            if status is not None and (status.failed or 0) > 0:
                reason = _failure_reason(status)
                return JobResult(name, False, reason, self.log(name, namespace))
            if self.clock() > deadline:
                return JobResult(name, False, f"no result within {timeout_s:.0f} s", "")
            time.sleep(poll_s)

    def log(self, name: str, namespace: str, tail_lines: int = 200) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}")
            if not pods.items:
                return ""
            meta = pods.items[-1].metadata
            if meta is None or not meta.name:
                return ""
            return str(
                self.core.read_namespaced_pod_log(meta.name, namespace, tail_lines=tail_lines)
            )
        except ApiException as exc:
            return f"(no log: HTTP {exc.status})"

    def delete(self, name: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise Unavailable(f"cannot delete Job {name}: HTTP {exc.status}") from None


def _describe(status: Any) -> str:
    if status is None:
        return "pending"
    counts = ((status.active, "active"), (status.succeeded, "succeeded"), (status.failed, "failed"))
    parts = [f"{n} {label}" for n, label in counts if n]
    return ", ".join(parts) or "pending"


def _failure_reason(status: Any) -> str:
    for condition in status.conditions or ():
        if condition.type == "Failed" and condition.status == "True":
            return f"{condition.reason or 'Failed'}: {condition.message or ''}".strip(": ")
    return "failed"


def container_command(argv: Sequence[str], push_bundle: str) -> list[str]:
    """`autoglm <argv>` in the container, then `autoglm model push BUNDLE` when asked."""
    command = ["autoglm", *argv]
    if not push_bundle:
        return command
    line = " ".join(shlex.quote(a) for a in command)
    return ["sh", "-c", f"{line} && autoglm model push {shlex.quote(push_bundle)}"]
