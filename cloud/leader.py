"""Leader election among control-plane replicas: only the leader runs the rollout
controller; every replica serves requests.

Two backends with one loop: a lease is taken or renewed every `duration / 3`; a replica is
leader while its last successful renewal is younger than the lease (measured on its own
monotonic clock, so a leader cut off from the store steps down by itself before another can
take over). `DatabaseLease` keeps the lease in the store (`leases` table), for replicas
sharing one PostgreSQL; `KubernetesLease` in a coordination.k8s.io/v1 Lease object through
the official client (optimistic concurrency on resourceVersion), inside a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from cloud.store.base import LeaseStore, Store
from edge_agent.errors import ConfigError
from edge_agent.waits import event_or_timeout

log = logging.getLogger(__name__)
LEASE_NAME = "autoglm-rollout-controller"


def default_replica_id() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class Elector:
    """The renewal loop; subclasses say how one attempt goes (`_attempt`: still ours?)."""

    def __init__(self, holder: str, duration_s: float) -> None:
        if duration_s <= 0:
            raise ConfigError("leader_lease_s must be > 0")
        self.holder = holder
        self.duration_s = duration_s
        self._valid_until = 0.0  # monotonic
        self.changes = 0
        self.on_change: list[Callable[[bool], None]] = []

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    async def run(self, stop: asyncio.Event) -> None:
        was = False
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    ours = await asyncio.to_thread(self._attempt)
                except Exception as exc:  # noqa: BLE001 - the store or API away: retry
                    log.warning("leader election: %s", exc)
                    ours = False
                if ours:
                    self._valid_until = started + self.duration_s
                now = self.is_leader
                if now != was:
                    self.changes += 1
                    log.warning(
                        "replica %s %s the rollout controller",
                        self.holder,
                        "now leads and runs" if now else "no longer leads; stopped",
                    )
                    for callback in self.on_change:
                        callback(now)
                    was = now
                await event_or_timeout(stop, self.duration_s / 3)
        finally:
            if self.is_leader:
                self._valid_until = 0.0
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._release)

    def _attempt(self) -> bool:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class AlwaysLeader(Elector):
    """One replica (the embedded default): it always leads."""

    def __init__(self) -> None:
        super().__init__("single", 1.0)
        self._valid_until = float("inf")

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


class DatabaseLease(Elector):
    """The lease as a row in the store, timed on the database's clock: replicas' own clocks
    may disagree (a skew of two thirds of the lease would let one take a healthy leader's
    lease), the database's is one. Whether this replica leads is still its own monotonic
    clock's call (`Elector`)."""

    def __init__(self, store: LeaseStore, holder: str, duration_s: float) -> None:
        super().__init__(holder, duration_s)
        self.store = store

    def _attempt(self) -> bool:
        duration = dt.timedelta(seconds=self.duration_s)
        # Ours afterwards means taken or renewed just now, until the database's now + duration.
        return self.store.try_lease(LEASE_NAME, self.holder, None, duration).holder == self.holder

    def _release(self) -> None:
        self.store.release_lease(LEASE_NAME, self.holder, None)


class KubernetesLease(Elector):
    """A Lease in `namespace` through the official client (in-cluster configuration)."""

    def __init__(self, namespace: str, holder: str, duration_s: float, api: Any = None) -> None:
        super().__init__(holder, duration_s)
        self.namespace = namespace
        self._api = api

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()  # type: ignore[no-untyped-call]
            self._api = client.CoordinationV1Api()
        return self._api

    def _attempt(self) -> bool:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = self._client()
        now = dt.datetime.now(dt.UTC)
        duration = int(max(1, round(self.duration_s)))
        try:
            lease = api.read_namespaced_lease(LEASE_NAME, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            created = client.V1Lease(
                metadata=client.V1ObjectMeta(name=LEASE_NAME, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.holder,
                    lease_duration_seconds=duration,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                api.create_namespaced_lease(self.namespace, created)
            except ApiException as conflict:
                if conflict.status == 409:
                    return False  # another replica created it first
                raise
            return True
        spec = lease.spec
        renewed = spec.renew_time or spec.acquire_time
        expired = (
            renewed is None
            or renewed + dt.timedelta(seconds=spec.lease_duration_seconds or duration) <= now
        )
        if spec.holder_identity != self.holder and not expired:
            return False
        change: dict[str, Any] = {"renewTime": _micro(now), "leaseDurationSeconds": duration}
        if spec.holder_identity != self.holder:
            change |= {
                "holderIdentity": self.holder,
                "acquireTime": _micro(now),
                "leaseTransitions": (spec.lease_transitions or 0) + 1,
            }
        # resourceVersion as a precondition: a concurrent change makes this a 409.
        body = {"metadata": {"resourceVersion": lease.metadata.resource_version}, "spec": change}
        try:
            api.patch_namespaced_lease(LEASE_NAME, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _release(self) -> None:
        api = self._client()
        lease = api.read_namespaced_lease(LEASE_NAME, self.namespace)
        if lease.spec.holder_identity == self.holder:
            expired = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
            api.patch_namespaced_lease(
                LEASE_NAME, self.namespace, {"spec": {"renewTime": _micro(expired)}}
            )


def _micro(when: dt.datetime) -> str:
    """A MicroTime as the API wants it."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_elector(mode: str, store: Store, replica_id: str, lease_s: float) -> Elector:
    """`mode`: off (one replica), database, kubernetes, or auto (kubernetes inside a
    cluster, else the database when it is PostgreSQL, else off)."""
    holder = replica_id or default_replica_id()
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if mode == "auto":
        mode = "kubernetes" if in_cluster else ("database" if store.shared else "off")
    if mode == "off":
        return AlwaysLeader()
    if mode == "database":
        return DatabaseLease(store, holder, lease_s)
    if mode == "kubernetes":
        namespace = os.environ.get("POD_NAMESPACE", "default")
        return KubernetesLease(namespace, holder, lease_s)
    raise ConfigError(f"leader_election {mode!r}: use auto, off, database or kubernetes")
