"""The database locked, gone or aborting a transaction while the control plane runs: the store
says Unavailable (or Conflict for a deadlock), which the API maps to UNAVAILABLE (ABORTED), and
never lets a raw driver error through as INTERNAL."""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import event, literal, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from cloud import webhooks
from cloud.captures import CaptureFilter
from cloud.domain import AlertFilter, AuditEntry
from cloud.outage_log import OutageLog
from cloud.service import maintenance_push, server
from cloud.service.records import store_batch
from cloud.store import Store, open_store
from cloud.store.sql import SqlStore
from edge_agent.errors import Conflict, Unavailable
from protos.autoglm.v1 import agent_pb2, operator_pb2
from tests.conftest import PG_ADMIN_DSN
from tests.support.agents import wait_for
from tests.support.cloud import RunningPlane
from tests.support.stores import NOW, bound_parameters_at_most
from tests.test_hostile_callers import DeviceStream, _device

pytestmark = pytest.mark.integration


def _short_busy_timeout(store: Store, ms: int = 200) -> None:
    """The store's SQLite connections wait `ms` for a lock, not 30 s (a test's patience)."""
    assert isinstance(store, SqlStore)

    def busy(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA busy_timeout = {ms}")

    event.listen(store.engine, "connect", busy)
    store.engine.dispose()  # connections made before the listener go


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Another process's writer holding the database's write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def _one_prediction() -> agent_pb2.RecordBatch:
    batch = agent_pb2.RecordBatch()
    record = batch.records.add()
    record.sequence = 1
    record.prediction.asset, record.prediction.model_version = "pump", "1"
    record.prediction.window_start.seconds = 1_790_000_000 - 10
    record.prediction.window_end.seconds = 1_790_000_000
    return batch


def test_a_locked_sqlite_database_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "autoglm.db"
    store = open_store(f"sqlite:///{path}")
    device = store.create_device("p", {}, "", NOW)
    _short_busy_timeout(store)
    with _locked(path):
        with pytest.raises(Unavailable, match="locked"):
            store.create_device("q", {}, "", NOW)
        with pytest.raises(Unavailable, match="locked"):  # what a session's storer meets
            store_batch(store, device.id, _one_prediction(), NOW)
    assert store.create_device("q", {}, "", NOW).name == "q"
    assert store_batch(store, device.id, _one_prediction(), NOW)[0].stored == 1
    store.close()


def test_listings_read_beside_a_held_sqlite_write_lock(tmp_path: Path) -> None:
    """The pure reads that can be long begin deferred, not IMMEDIATE: while another
    connection holds the write lock they answer at once (they waited for it, and past the
    busy timeout were Unavailable), and a write still waits for its turn."""
    path = tmp_path / "autoglm.db"
    store = open_store(f"sqlite:///{path}")
    device = store.create_device("p", {}, "", NOW)
    store_batch(store, device.id, _one_prediction(), NOW)
    store.add_audit(AuditEntry(NOW, "admin", "admin", "M", "p", "OK"))
    _short_busy_timeout(store)
    with _locked(path):
        assert [p.sequence for p in store.list_predictions(device.id)] == [1]
        assert store.list_alert_events(device.id) == []
        assert store.list_alerts(AlertFilter()) == []
        assert [d.name for d in store.list_devices({})] == ["p"]
        assert [a.method for a in store.list_audit(None, "", 10)] == ["M"]
        assert store.list_captures(CaptureFilter(since=NOW)) == []
        with pytest.raises(Unavailable, match="locked"):
            store.create_device("q", {}, "", NOW)
    store.close()


def test_a_statement_sqlite_can_never_run_is_not_unavailable(tmp_path: Path) -> None:
    """SQLite's OperationalError covers a missing table and too many SQL variables as well
    as a lock: those fail the same way every time, so they stay the driver's error (INTERNAL
    with a traceback, a bug to fix), not Unavailable's 'try again'."""
    path = tmp_path / "autoglm.db"
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SqlStore)
    store.create_device("p", {}, "", NOW)
    with sqlite3.connect(path) as other:
        other.execute("DROP TABLE operators")  # a store whose schema lost a table
    with pytest.raises(OperationalError, match="no such table"):
        store.list_operators()
    bound_parameters_at_most(store, 20)
    with pytest.raises(OperationalError, match="too many SQL variables"), store._tx() as s:
        s.execute(_in_list(50))
    assert store.get_device("p").name == "p"  # the rest works on
    store.close()


def _in_list(count: int) -> Any:
    """A statement with `count` bound parameters."""
    return select(literal(1)).where(literal(0).in_(list(range(1, count + 1))))


def test_a_locked_database_is_unavailable_to_operators_and_sessions(
    plane: RunningPlane, tmp_path: Path
) -> None:
    stream = DeviceStream.accepted(plane, _device(plane, tmp_path, "p1"))
    _short_busy_timeout(plane.plane.store)
    path = Path(plane.config.resolved_database_url.removeprefix("sqlite:///"))
    with _locked(path), plane.client() as client:
        with pytest.raises(Unavailable, match="locked"):  # was INTERNAL
            client.register_device(operator_pb2.RegisterDeviceRequest(name="p2"))
        # A batch the store cannot take ends the session UNAVAILABLE (the agent sends it
        # again), not OK as if the agent had finished.
        stream.send(agent_pb2.AgentMessage(records=_one_prediction()))
        ending = stream.ending()
    stream.close()
    assert ending is not None and ending.code() == grpc.StatusCode.UNAVAILABLE, ending
    assert "locked" in str(ending.details())


@pytest.mark.postgres
def test_a_database_that_goes_away_is_unavailable_then_recovers(pg_url: str) -> None:
    store = open_store(pg_url)
    store.create_device("p", {}, "", NOW)
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        try:
            with pytest.raises(Unavailable, match="database"):
                store.get_device("p")
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert store.get_device("p").name == "p"
    store.close()


@pytest.mark.postgres
def test_postgres_errors_are_classified_by_sqlstate(pg_url: str) -> None:
    """A statement cancelled by its timeout (57014) is Unavailable; psycopg refusing a
    statement of more than 65,535 parameters (an OperationalError without SQLSTATE, the
    connection fine) stays the driver's error, as a missing table does."""
    store = open_store(pg_url)
    assert isinstance(store, SqlStore)
    with pytest.raises(Unavailable, match="statement timeout"), store._tx() as s:
        s.execute(text("SET LOCAL statement_timeout = 10"))
        s.execute(text("SELECT pg_sleep(5)"))
    with pytest.raises(OperationalError, match="65535"), store._tx() as s:
        s.execute(_in_list(70_000))
    with pytest.raises(ProgrammingError, match="does not exist"), store._tx() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    assert store.create_device("p", {}, "", NOW).name == "p"
    store.close()


@pytest.mark.postgres
def test_a_deadlock_is_a_conflict(pg_url: str) -> None:
    """Two transactions locking two rows in opposite orders: PostgreSQL aborts one (40P01)."""
    store = open_store(pg_url)
    assert isinstance(store, SqlStore)
    a, b = (store.create_device(n, {}, "", NOW).id for n in ("a", "b"))
    both_hold_one = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def lock(first: str, second: str) -> None:
        lock_row = text("SELECT id FROM devices WHERE id = :id FOR UPDATE")
        try:
            with store._tx() as s:
                s.execute(lock_row, {"id": first})
                both_hold_one.wait()
                s.execute(lock_row, {"id": second})
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=p) for p in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], Conflict), errors
    store.close()


@pytest.fixture
def plane_with_still_outage_clock(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> RunningPlane:
    """The conftest plane whose background jobs' OutageLogs read a clock that stands still:
    however slow the run, no report period passes, so each outage is one line."""
    still = functools.partial(OutageLog, clock=lambda: 0.0)
    for module in (server, webhooks, maintenance_push):
        monkeypatch.setattr(module, "OutageLog", still)
    plane: RunningPlane = request.getfixturevalue("plane")  # started after the patch
    return plane


def test_background_jobs_report_a_locked_database_in_a_line_not_a_traceback_per_retry(
    plane_with_still_outage_clock: RunningPlane,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The presence flush, the desired-state feed (every 0.2 s) and the session recheck
    (0.5 s) meet the lock at each retry: one warning each, no traceback, and a line when
    each works again. (Past OUTAGE_REPORT_S a job repeats its line; the OutageLog test
    below covers that with its own clock.)"""
    plane = plane_with_still_outage_clock
    caplog.set_level(logging.INFO, "cloud.service.server")
    caplog.set_level(logging.INFO, "cloud.webhooks")  # its delivery round: a line too
    caplog.set_level(logging.INFO, "cloud.service.maintenance_push")
    stream = DeviceStream.accepted(plane, _device(plane, tmp_path, "p1"))
    _short_busy_timeout(plane.plane.store)
    failed = threading.Semaphore(0)
    event.listen(plane.plane.store.engine, "handle_error", lambda _context: failed.release())
    path = Path(plane.config.resolved_database_url.removeprefix("sqlite:///"))
    jobs = ("background job flush:", "background job recheck sessions:")

    def server_lines(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "cloud.service.server" and r.levelno == level
        ]

    with _locked(path):
        stream.send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1)))
        stream.next("heartbeat_ack")  # presence has news to write
        wait_for(lambda: all(any(j in w for w in server_lines(logging.WARNING)) for j in jobs), 60)
        for _ in range(12):  # then more retries
            assert failed.acquire(timeout=60), "the jobs stopped meeting the lock"
    warned = sorted(line.split(":")[0] for line in server_lines(logging.WARNING))
    assert len(warned) == len(set(warned)), warned  # one line per job, not one per retry
    assert all("locked" in line for line in server_lines(logging.WARNING))

    def back() -> list[str]:
        lines = server_lines(logging.INFO)
        return sorted(line.split(" works again")[0] for line in lines if "works again" in line)

    wait_for(lambda: len(back()) >= len(warned), timeout=60)
    stream.close()
    assert back() == warned, back()
    quiet = ("cloud.webhooks", "cloud.service.maintenance_push")
    traced = [r.getMessage() for r in caplog.records if r.name in quiet and r.exc_info]
    assert not traced, traced  # the webhook round logged 'failed' with a traceback per retry
    assert not [r for r in caplog.records if r.name == "cloud.service.server" and r.exc_info], [
        r.getMessage() for r in caplog.records if r.name == "cloud.service.server"
    ]


def test_an_outage_is_reported_once_a_period_with_what_was_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    outage = OutageLog(logging.getLogger("test.outage"), "job x", every_s=60, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "test.outage")
    for at in (0.0, 1.0, 30.0, 59.0, 61.0, 62.0):
        now[0] = at
        outage.failed(Unavailable("database is locked"), 1.0)
    outage.worked()
    outage.worked()
    assert [r.getMessage() for r in caplog.records] == [
        "job x: database is locked; retrying every 1.0s",
        "job x: database is locked; retrying every 1.0s (3 more failure(s) since the last line)",
        "job x works again after 6 failure(s)",
    ]


def test_a_pool_with_no_connection_free_in_time_is_unavailable(tmp_path: Path) -> None:
    """Callers waiting out a lock can hold every pooled connection; the next one's wait for
    the pool ends in SQLAlchemy's pool TimeoutError, which was INTERNAL with a traceback."""
    from sqlalchemy import create_engine

    from cloud.store.sql_base import _mapped_errors

    engine = create_engine(
        f"sqlite:///{tmp_path / 'x.db'}", pool_size=1, max_overflow=0, pool_timeout=0.05
    )
    held = engine.connect()
    with pytest.raises(Unavailable, match="no connection came free"), _mapped_errors():
        engine.connect()
    held.close()
    engine.dispose()
