"""A device repeating rollout reports cannot flood the control plane's log or hold up its
rollouts: what the reports make it log comes once a minute per device and reason, with a
count of what was left out, and a report on a rollout that is unknown (or not the device's)
is dropped after a read, without the rollout controller's lock or a write transaction."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from cloud.domain import InstallOutcome
from cloud.rollout_reports import log as reports_log
from cloud.sparse_log import SparseLog
from cloud.store.sql import SqlStore
from protos.autoglm.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.conftest import register
from tests.support.agents import enroll_identity
from tests.support.cloud import RunningPlane
from tests.test_rollout_core import Fleet, _create, fleet

__all__ = ["fleet"]  # the fixture the tests below take

UNKNOWN = "reported on unknown rollout"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture, phrase: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if phrase in r.getMessage()]


@pytest.fixture
def sparse_clock(fleet: Fleet) -> FakeClock:
    clock = FakeClock()
    fleet.controller.reports.sparse = SparseLog(reports_log, clock=clock)
    return clock


@pytest.mark.unit
def test_reports_on_unknown_rollouts_are_logged_once_a_minute_per_device(
    fleet: Fleet, sparse_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud.rollout_reports")
    for _ in range(200):
        fleet.installed("edge-0", str(uuid.uuid4()), InstallOutcome.VERIFY_FAILED, detail="x")
        fleet.shadow("edge-0", str(uuid.uuid4()))
    fleet.installed("edge-1", str(uuid.uuid4()), InstallOutcome.VERIFY_FAILED)
    lines = _lines(caplog, UNKNOWN)
    assert len(lines) == 2, lines  # one per device
    assert fleet.ids["edge-0"] in lines[0] and fleet.ids["edge-1"] in lines[1], lines
    sparse_clock.now += 59.0
    fleet.installed("edge-0", str(uuid.uuid4()), InstallOutcome.VERIFY_FAILED)
    assert len(_lines(caplog, UNKNOWN)) == 2
    sparse_clock.now += 1.0
    fleet.installed("edge-0", str(uuid.uuid4()), InstallOutcome.VERIFY_FAILED)
    lines = _lines(caplog, UNKNOWN)
    assert len(lines) == 3 and "(400 more like it from this device" in lines[-1], lines


@pytest.mark.unit
def test_repeated_failure_reports_on_a_real_rollout_are_logged_sparsely(
    fleet: Fleet, sparse_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rollout_id = _create(fleet, ("100%",))
    caplog.set_level(logging.INFO, logger="cloud.rollout_reports")
    for i in range(100):
        fleet.installed("edge-0", rollout_id, InstallOutcome.VERIFY_FAILED, detail=f"bad {i}")
    failed = _lines(caplog, "failed: verify_failed")
    assert len(failed) == 1, failed
    assert fleet.states(rollout_id)["edge-0"] == "failed"
    target = fleet.store.rollout_target(rollout_id, fleet.ids["edge-0"])
    assert target is not None and target.detail == "verify_failed: bad 99"  # all recorded
    for i in range(50):  # a full disk, each said differently
        detail = f"disk full {i}"
        fleet.installed("edge-1", rollout_id, InstallOutcome.DOWNLOAD_FAILED, detail=detail,
                        retrying=True)  # fmt: skip
    assert len(_lines(caplog, "cannot install yet")) == 1


@pytest.mark.unit
def test_a_report_on_an_unknown_rollout_takes_no_lock_and_no_write_transaction(
    fleet: Fleet,
) -> None:
    store = fleet.store
    assert isinstance(store, SqlStore)
    writes: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.strip().upper().startswith("BEGIN IMMEDIATE"):
            writes.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    done = threading.Event()

    def report() -> None:
        for _ in range(20):
            fleet.installed("edge-0", str(uuid.uuid4()), InstallOutcome.VERIFY_FAILED)
            fleet.shadow("edge-0", str(uuid.uuid4()))
        done.set()

    try:
        with fleet.controller._lock:  # a tick or an operator's action under way
            reporter = threading.Thread(target=report, daemon=True)
            reporter.start()
            finished = done.wait(60)
        reporter.join(60)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert finished, "the reports waited for the rollout controller's lock"
    assert writes == [], f"{len(writes)} write transaction(s) for reports on unknown rollouts"


def _hello() -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            agent_version="1.0",
            status=agent_pb2.AgentStatus(model_version="1"),
            host=common_pb2.HostFacts(hostname="edge"),
        )
    )


def _reports(count: int) -> Iterator[agent_pb2.AgentMessage]:
    yield _hello()
    for _ in range(count):
        report = agent_pb2.InstallReport(
            rollout_id=str(uuid.uuid4()), model_version="9", outcome=3, detail="x" * 1024
        )
        yield agent_pb2.AgentMessage(install=report)
    yield agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1))


@pytest.mark.integration
def test_a_device_flooding_install_reports_makes_one_log_line(
    plane: RunningPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud.rollout_reports")
    identity = enroll_identity(register(plane, "flood", site="a"), tmp_path / "flood")
    with grpc.secure_channel(plane.device_address, identity.credentials()) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Session(_reports(300), timeout=120)
        # Messages are handled in order: the heartbeat's answer comes after every report.
        kinds = []
        for message in call:
            kinds.append(message.WhichOneof("body"))
            if kinds[-1] == "heartbeat_ack":
                break
        call.cancel()
    assert "heartbeat_ack" in kinds, kinds
    lines = _lines(caplog, UNKNOWN)
    assert len(lines) == 1 and identity.info.device_id in lines[0], (len(lines), lines[:3])


@pytest.mark.unit
def test_the_sparse_log_stays_bounded_and_says_what_it_left_out_when_it_forgets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    logger = logging.getLogger("tests.sparse")
    sparse = SparseLog(logger, every_s=60.0, clock=clock, max_keys=3)
    caplog.set_level(logging.INFO, logger="tests.sparse")
    for device in ("a", "b", "c"):
        for _ in range(5):
            sparse.warning(device, "why", "device %s did it", device)
    assert len(caplog.records) == 3
    clock.now += 30.0
    sparse.warning("d", "why", "device %s did it", "d")  # none idle: all forgotten, said
    said = [r.getMessage() for r in caplog.records[3:]]
    assert sorted(said[:3]) == [f"device {d}: 4 more 'why' line(s) not logged" for d in "abc"]
    assert said[3:] == ["device d did it"] and len(sparse._keys) == 1
    sparse.warning("a", "why", "device %s did it", "a")  # forgotten: logged again at once
    assert caplog.records[-1].getMessage() == "device a did it"
