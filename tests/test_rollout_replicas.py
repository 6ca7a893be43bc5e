"""Rollout writes from two control-plane replicas (two stores, so two engines, on one
database: one SQLite file or one PostgreSQL): what one replica decided on a read the other
changed meanwhile is never written over the other's."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from cloud.domain import (
    DesiredModel,
    Gates,
    InstallOutcome,
    InstallReport,
    ModelRecord,
    PresenceUpdate,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetState,
    Wave,
)
from cloud.rollout_rules import RolloutSettings
from cloud.rollouts import RolloutController
from cloud.store import Store, open_store
from cloud.store.sql import SqlStore
from cloud.store.tables import ModelRow
from edge_agent.errors import AlreadyExists

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
SETTINGS = RolloutSettings(offline_after=dt.timedelta(seconds=30))


def _model(version: str) -> ModelRecord:
    digest, signature = f"sha256:{version[0] * 64}", f"sha256:{'e' * 64}"
    return ModelRecord("pump", version, digest, signature, 1, T0, {})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Replica A's store and replica B's, on one database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cloud.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    a = open_store(url)
    b = open_store(url)
    yield a, b
    b.close()
    a.close()


def _enrolled_online(store: Store, name: str) -> str:
    device = store.create_device(name, {"site": "x"}, "", T0)
    store.add_enrollment_token(device.id, f"h-{name}", T0, T0 + dt.timedelta(hours=1))
    store.enroll(f"h-{name}", T0, lambda d: d.id, lambda c: ("serial", f"fp-{c}", T0))
    store.record_presence([PresenceUpdate(device.id, T0, True)])
    return device.id


def _ended_with_a_shadow_install_pending(store: Store, device_id: str) -> RolloutRecord:
    """Rollout R1 of version 2222: its one wave soaked and promoted, and it ended while the
    device, sent the version in shadow, had not reported the install yet."""
    wave = Wave(0, "100%", 1, T0, T0, T0, T0)
    r1 = RolloutRecord(
        id="r1", model_name="pump", model_version="2222", selector="site=x",
        state=RolloutState.RUNNING, waves=(wave,), current_wave=0, soak_s=60, gates=Gates(),
        reason="", created_at=T0, updated_at=T0,
    )  # fmt: skip
    target = RolloutTarget(
        "r1", device_id, 0, TargetState.INSTALLING, "desired state sent", "1111", "pump",
        updated_at=T0,
    )  # fmt: skip
    store.create_rollout(r1, [target])
    model = _model("2222")
    store.set_desired(
        [DesiredModel(device_id, "pump", "2222", model.manifest_digest,
                      model.signature_digest, "r1", True, T0)]
    )  # fmt: skip
    ended = dataclasses.replace(store.get_rollout("r1"), state=RolloutState.SUCCEEDED)
    return store.save_rollout(ended)[0]


def test_a_late_install_report_never_serves_an_ended_rollout_over_a_newer_one(
    replicas: tuple[Store, Store],
) -> None:
    """Replica B handles the late shadow install of ended rollout R1 (it sends the version to
    serve, having read that the device's desired state is still R1's shadow one) while an
    operator creates R2 for the device through replica A, between B's read and B's write.
    The device keeps R2's version and R2's target moves on as usual."""
    a, b = replicas
    for version in ("1111", "2222", "3333"):
        a.add_model(_model(version))
    device_id = _enrolled_online(a, "d1")
    _ended_with_a_shadow_install_pending(a, device_id)
    on_a = RolloutController(a, SETTINGS, lambda: T0)
    on_b = RolloutController(b, SETTINGS, lambda: T0)
    created: list[RolloutRecord] = []
    read_model = b.get_model

    def operator_on_a_meanwhile(name: str, version: str) -> ModelRecord:
        if not created:  # B has read the desired state and now reads the model to send
            created.append(on_a.create("pump", "3333", "site=x", ["100%"], 0, Gates())[0])
        return read_model(name, version)

    b.get_model = operator_on_a_meanwhile  # type: ignore[method-assign]
    report = InstallReport("r1", "2222", InstallOutcome.INSTALLED, backend="onnxruntime")
    on_b.on_install(device_id, report)
    assert created, "B never read the model: the late serve was not reached"
    r2 = created[0]
    desired = a.get_desired(device_id)
    assert desired is not None
    assert (desired.rollout_id, desired.model_version, desired.shadow) == (r2.id, "3333", False)
    on_a.on_install(device_id, InstallReport(r2.id, "3333", InstallOutcome.INSTALLED))
    on_a.tick()
    done = a.get_rollout(r2.id)
    assert done.state is RolloutState.SUCCEEDED, done.reason


def test_a_target_written_after_a_shadow_report_on_another_replica_keeps_the_report(
    replicas: tuple[Store, Store],
) -> None:
    """Replica A reads a target and saves it moved; replica B stored the device's shadow
    report in between (no revision bump, so A's compare-and-set passes): the report stays."""
    a, b = replicas
    a.add_model(_model("2222"))
    device_id = _enrolled_online(a, "d1")
    r1 = _ended_with_a_shadow_install_pending(a, device_id)
    read = a.rollout_target(r1.id, device_id)
    assert read is not None and read.shadow == {}
    b.record_shadow(r1.id, device_id, {"windows": 40, "agreement": 0.99})
    a.save_target(dataclasses.replace(read, state=TargetState.SHADOWING, detail="installed"))
    stored = b.rollout_target(r1.id, device_id)
    assert stored is not None and stored.state is TargetState.SHADOWING
    assert stored.shadow == {"windows": 40, "agreement": 0.99}, stored.shadow


@pytest.mark.postgres
@pytest.mark.parametrize("digest", ["same", "other"])
def test_two_replicas_registering_one_bundle_at_once(pg_url: str, digest: str) -> None:
    """Replica A's registration of pump:2222 is inserted, not yet committed, when replica B
    registers it too (B waits on A's row): once A commits, B gets the stored record for the
    same bundle and AlreadyExists for another one, never the database's IntegrityError."""
    a, b = open_store(pg_url), open_store(pg_url)
    assert isinstance(a, SqlStore)
    try:
        pushed = _model("2222")
        mine = pushed if digest == "same" else dataclasses.replace(pushed, manifest_digest="x")
        outcome: list[object] = []
        with a.engine.connect() as held:
            held.execute(insert(ModelRow).values(**dataclasses.asdict(pushed)))
            thread = threading.Thread(target=lambda: outcome.append(_added(b, mine)))
            thread.start()
            _wait_for_a_lock_wait(a)
            held.commit()
        thread.join(timeout=60)
        assert outcome, "B's registration never returned"
        if digest == "same":
            assert outcome[0] == pushed, outcome
        else:
            assert isinstance(outcome[0], AlreadyExists), outcome
            assert "pushed before with another manifest" in str(outcome[0])
    finally:
        b.close()
        a.close()


def _added(store: Store, model: ModelRecord) -> object:
    try:
        return store.add_model(model)
    except Exception as exc:  # noqa: BLE001 - what the caller would get, for the test to judge
        return exc


def _wait_for_a_lock_wait(store: SqlStore) -> None:
    """Until a statement on the database waits for a lock (B's, on A's uncommitted row)."""
    query = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
    deadline = time.monotonic() + 60
    with store.engine.connect() as conn:
        while conn.execute(query).scalar_one() == 0:
            assert time.monotonic() < deadline, "B never waited on A's row"
            time.sleep(0.05)
            conn.rollback()  # a fresh snapshot each look
