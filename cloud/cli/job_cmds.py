"""`--executor kubernetes` for `autoglm model train` and `model build-engines`: the same
command, run as a Kubernetes Job (see cloud/k8s_jobs.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

from cloud.cli.numbers import decimal, whole
from cloud.cli.output import parse_labels
from edge_agent.errors import ConfigError, FailedPrecondition, InvalidInput

# Flags that steer the Job; they are not passed on to the command inside it.
JOB_FLAGS = {
    "--executor": 1,
    "--image": 1,
    "--namespace": 1,
    "--gpus": 1,
    "--node-selector": 1,
    "--data-claim": 1,
    "--artifacts-claim": 1,
    "--push-secret": 1,
    "--kubeconfig": 1,
    "--job-name": 1,
    "--job-timeout": 1,
    "--keep-job": 0,
    "--signing-key": 1,  # inside the Job the key comes from the push Secret
}


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running as a Kubernetes Job (--executor kubernetes)")
    group.add_argument("--executor", choices=("local", "kubernetes"), default="local")
    group.add_argument("--image", help="the autoglm image (pinned tag or digest)")
    group.add_argument("--namespace", default="default")
    group.add_argument(
        "--gpus", type=whole(0, 64), default=1, help="nvidia.com/gpu per Job (default 1)"
    )
    group.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    group.add_argument("--data-claim", default="", help="PVC with the data, mounted at /data")
    group.add_argument("--artifacts-claim", default="", help="PVC mounted at /artifacts")
    group.add_argument(
        "--push-secret",
        default="",
        help="Secret with AUTOGLM_SERVER, AUTOGLM_TOKEN, ca.crt, signing.key: sign and push",
    )
    group.add_argument("--kubeconfig", type=Path, help="default: in-cluster, else ~/.kube/config")
    group.add_argument("--job-name", default="", help="default: autoglm-<command>-<time>")
    group.add_argument(
        "--job-timeout",
        type=decimal(0, 30 * 86_400, above=True),
        default=6 * 3600.0,
        help="seconds (default 6 h)",
    )
    group.add_argument("--keep-job", action="store_true", help="leave the Job and its pod")


def container_argv(argv: Sequence[str]) -> list[str]:
    """`argv` (after `autoglm`) without the Job flags."""
    out: list[str] = []
    skip = 0
    for item in argv:
        if skip:
            skip -= 1
            continue
        flag = item.split("=", 1)[0]
        if flag in JOB_FLAGS:
            skip = 0 if "=" in item else JOB_FLAGS[flag]
            continue
        out.append(item)
    return out


def api_client(kubeconfig: Path | None) -> object:
    from kubernetes import client, config

    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return client.ApiClient()
        except config.ConfigException:
            return config.new_client_from_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes access: {exc} (pass --kubeconfig)") from None


def run_as_job(
    args: argparse.Namespace, kind: str, push_bundle: str, argv: Sequence[str] | None = None
) -> int:
    from cloud.k8s_jobs import JobExecutor, JobSpec, container_command

    if not args.image:
        raise InvalidInput("--executor kubernetes needs --image")
    command = container_argv(list(argv if argv is not None else sys.argv[1:]))
    name = args.job_name or f"autoglm-{kind}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    try:
        selector = parse_labels(args.node_selector)
    except ValueError as exc:
        raise InvalidInput(f"--node-selector: {exc}") from None
    spec = JobSpec(
        name=name,
        image=args.image,
        command=container_command(command, push_bundle if args.push_secret else ""),
        namespace=args.namespace,
        gpus=args.gpus,
        node_selector=selector,
        data_claim=args.data_claim,
        artifacts_claim=args.artifacts_claim,
        push_secret=args.push_secret,
    )
    executor = JobExecutor(api_client(args.kubeconfig))
    executor.submit(spec)
    print(f"Job {spec.namespace}/{name} created; following it", file=sys.stderr)
    try:
        result = executor.follow(
            name,
            spec.namespace,
            args.job_timeout,
            on_status=lambda s: print(f"  {name}: {s}", file=sys.stderr),
        )
    finally:
        if not args.keep_job:
            executor.delete(name, spec.namespace)
    if result.log:
        print(result.log.rstrip(), file=sys.stderr)
    if not result.succeeded:
        raise FailedPrecondition(f"Job {name} failed: {result.reason}")
    print(f"Job {name} succeeded" + (" and pushed the bundle" if args.push_secret else ""))
    return 0
