"""Enrollment groups (zero-touch enrollment for factory images): the store on SQLite and
PostgreSQL (uses counted under concurrency, names unique, revoked and expired groups
refused), then real agents enrolling through a real control plane with one bootstrap."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud.domain import DeviceRecord, DeviceState, EnrollmentGroup
from cloud.service.serde import bootstrap_from_group
from cloud.store import Store, open_store
from edge_agent.bootstrap import Bootstrap, read_bootstrap, write_bootstrap
from edge_agent.enroll import enroll
from edge_agent.errors import AlreadyExists, InvalidInput, PermissionDenied, Unauthenticated
from protos.autoglm.v1 import operator_pb2
from tests.support.cloud import init_plane, start_plane

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'autoglm.db'}"
    opened = open_store(url)
    yield opened
    opened.close()


def _issue(device: DeviceRecord) -> str:
    return f"cert-for-{device.id}"


def _activate(cert: str) -> tuple[str, str, dt.datetime]:
    return "serial", "fp-" + cert[-8:], NOW + dt.timedelta(days=365)


def _group(uses: int = 3, **changes: object) -> EnrollmentGroup:
    fields: dict[str, object] = dict(
        name="line-2", labels={"site": "a", "asset": "{name}"}, profile="jetson-orin-nx",
        max_uses=uses, uses=0, created_at=NOW, expires_at=NOW + dt.timedelta(days=30),
    )  # fmt: skip
    return EnrollmentGroup(**(fields | changes))  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_group_enrolls_up_to_its_uses_each_device_under_its_name(store: Store) -> None:
    store.create_enrollment_group(_group(uses=2), "hash-g")
    with pytest.raises(AlreadyExists):
        store.create_enrollment_group(_group(), "hash-other")
    device, cert = store.enroll_in_group("hash-g", "pump-7", NOW, _issue, _activate)
    assert device.state is DeviceState.ACTIVE and device.name == "pump-7"
    assert device.labels == {"site": "a", "asset": "pump-7"} and device.profile == "jetson-orin-nx"
    assert cert == f"cert-for-{device.id}" and device.cert_fingerprint
    with pytest.raises(AlreadyExists, match="pump-7"):
        store.enroll_in_group("hash-g", "pump-7", NOW, _issue, _activate)
    store.enroll_in_group("hash-g", "pump-8", NOW, _issue, _activate)
    with pytest.raises(PermissionDenied, match="enrolled its 2"):
        store.enroll_in_group("hash-g", "pump-9", NOW, _issue, _activate)
    with pytest.raises(Unauthenticated, match="unknown"):
        store.enroll_in_group("nope", "pump-9", NOW, _issue, _activate)
    (listed,) = store.list_enrollment_groups()
    assert listed.uses == 2 and listed.revoked_at is None


@pytest.mark.integration
def test_revoked_and_expired_groups_and_failed_issues_enroll_nobody(store: Store) -> None:
    store.create_enrollment_group(_group(), "hash-g")

    def refuse(_: DeviceRecord) -> str:
        raise PermissionDenied("the CSR names someone else")

    with pytest.raises(PermissionDenied):
        store.enroll_in_group("hash-g", "pump-1", NOW, refuse, _activate)
    assert store.list_devices({}) == [] and store.list_enrollment_groups()[0].uses == 0
    late = NOW + dt.timedelta(days=31)
    with pytest.raises(PermissionDenied, match="expired"):
        store.enroll_in_group("hash-g", "pump-1", late, _issue, _activate)
    store.revoke_enrollment_group("line-2", NOW)
    assert store.revoke_enrollment_group("line-2", NOW).revoked_at == NOW  # idempotent
    with pytest.raises(PermissionDenied, match="revoked"):
        store.enroll_in_group("hash-g", "pump-1", NOW, _issue, _activate)


@pytest.mark.integration
def test_concurrent_enrollments_never_exceed_the_uses(store: Store) -> None:
    store.create_enrollment_group(_group(uses=3), "hash-g")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.enroll_in_group("hash-g", f"pump-{i}", NOW, _issue, _activate)
            outcomes.append("ok")
        except PermissionDenied:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 3, outcomes
    assert len(store.list_devices({})) == 3


@pytest.mark.integration
@pytest.mark.slow
def test_one_bootstrap_enrolls_several_devices_through_a_real_control_plane(
    tmp_path: Path,
) -> None:
    state = tmp_path / "cloud"
    plane = start_plane(state, init_plane(state).operator_token)
    try:
        with plane.client() as client:
            for bad, message in (({"max_uses": 0}, "uses must be"),
                                 ({"labels": {"site": "a,b"}}, "label 'site'"),
                                 ({"profile": "toaster"}, "unknown device profile")):  # fmt: skip
                request = operator_pb2.CreateEnrollmentGroupRequest(name="g", max_uses=2)
                for key, value in bad.items():
                    if key == "labels":
                        request.labels.update(value)  # type: ignore[arg-type]
                    else:
                        setattr(request, key, value)
                with pytest.raises(InvalidInput, match=message):
                    client.create_enrollment_group(request)
            created = client.create_enrollment_group(
                operator_pb2.CreateEnrollmentGroupRequest(
                    name="line-2", labels={"site": "a", "asset": "{name}"}, max_uses=2
                )
            )
        path = tmp_path / "image" / "bootstrap.yaml"
        path.parent.mkdir()
        write_bootstrap(path, bootstrap_from_group(created))
        bootstrap = read_bootstrap(path)  # what the factory image carries
        assert bootstrap.group == "line-2" and not bootstrap.device_id
        with pytest.raises(ValidationError, match="names neither a device"):
            Bootstrap.model_validate(bootstrap.model_dump() | {"group": ""})
        first = enroll(bootstrap, tmp_path / "a", name="pump-1")
        second = enroll(bootstrap, tmp_path / "b", name="pump-2")
        assert (first.device_name, second.device_name) == ("pump-1", "pump-2")
        with pytest.raises(PermissionDenied, match="enrolled its 2"):
            enroll(bootstrap, tmp_path / "c", name="pump-3")
        with plane.client() as client:
            devices = {d.name: dict(d.labels) for d in client.list_devices()}
            assert devices == {"pump-1": {"site": "a", "asset": "pump-1"},
                               "pump-2": {"site": "a", "asset": "pump-2"}}  # fmt: skip
            (group,) = client.list_enrollment_groups()
            assert group.uses == 2
            assert client.revoke_enrollment_group("line-2").HasField("revoked_at")
    finally:
        plane.stop()
