"""The SQL store's shared part: engine, migrations, transactions, device lookup."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event, make_url, select, text
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    InternalError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from cloud.domain import (
    DeviceRecord,
    DeviceState,
)
from cloud.store.tables import (
    DeviceRow,
)
from edge_agent.errors import (
    AutoglmError,
    Conflict,
    FailedPrecondition,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")


def normalise_url(url: str) -> str:
    """Accepts plain `postgresql://` URLs and uses the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# The execution option of the engine `SqlBase._read_tx`'s sessions use (see make_engine).
READ_ONLY = "autoglm_read_only"


# Seconds a SQLite connection waits for another's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0
# Journal modes SQLite may answer `PRAGMA journal_mode=WAL` with that are as asked: WAL, and
# an in-memory database's own (it has no file to keep a log beside).
_WAL_OR_MEMORY = {"wal", "memory"}


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        )
        refused: list[str] = []  # the journal mode SQLite kept instead of WAL, once warned

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling off: it starts none before a SELECT, so a
            # read-modify-write read outside any transaction (and FOR UPDATE means nothing
            # to SQLite): two writers overwrote each other. `_begin_immediate` instead.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            # SQLite answers with the mode it is in: WAL is refused where the file system
            # cannot share memory between connections (a network mount, some VFSes). The
            # store still works, with readers and the writer waiting for one another.
            mode = str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if mode not in _WAL_OR_MEMORY and not refused:
                refused.append(mode)
                log.warning(
                    "SQLite database %s: journal mode '%s', not WAL (the file system refuses "
                    "it: a network or read-only mount?): listings wait for writers and writers "
                    "for listings, so 'database is locked' comes sooner; keep the database on "
                    "a local disk",
                    engine.url.database, mode,
                )  # fmt: skip
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # A transaction takes the write lock when it starts (waiting up to the busy
            # timeout): one writer at a time, each reading what the last one committed.
            # SQLAlchemy's recipe for pysqlite. One that only reads (SqlBase._read_tx) begins
            # deferred instead: under WAL it reads a snapshot beside the writer, holding no
            # lock, so a long listing neither waits for nor delays batches and session setups.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=8, max_overflow=8, connect_args=pg_connect_args(url)
    )


# What every PostgreSQL session starts with. Fleet-wide rows (the alert and desired-state
# counters, the rollout lock) stay locked until their transaction ends; a replica frozen in
# one (SIGSTOP, a paused VM, a host cut off) kept them for hours, and every other replica's
# callers waited on them until their pools ran dry, lease renewals and plain reads included.
# Now a wait for a lock gives up after PG_LOCK_TIMEOUT_MS (the caller gets Unavailable and
# retries: the agent its batch, the elector its lease) and the server ends a session left
# idle inside a transaction after PG_IDLE_IN_TRANSACTION_MS, letting its locks go. No
# statement_timeout: a statement that runs is not a frozen one (migrations and listings may
# be long); one set in the URL's `options` is kept.
PG_LOCK_TIMEOUT_MS = 5_000
PG_IDLE_IN_TRANSACTION_MS = 60_000
# libpq's TCP keepalives: a database server gone (a failover, a cut network) is noticed
# within about 25 s, not the system's default two hours.
PG_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                 "keepalives_count": "3"}  # fmt: skip


# "off": no `options` startup parameter (the settings above and UTC are then the role's or
# the server's to set), for a connection pooler that refuses it.
PG_SESSION_SETTINGS_ENV = "AUTOGLM_PG_SESSION_SETTINGS"


def pg_connect_args(url: str) -> dict[str, str]:
    """libpq connection parameters for a PostgreSQL URL: the session settings above, then
    the URL's own `options` (or PGOPTIONS, as libpq reads it when the URL has none), which
    win where they set the same thing, then the time zone, UTC whatever they say; the
    keepalives where the URL names none of its own.

    UTC: the server's time zone (its own, the database's or the role's) is how it turns a
    timestamptz into text for the driver. In another zone a time near the calendar's ends
    (9999-12-31, from a device) came out as year 10000 or year 0, which Python cannot hold:
    every listing that included it failed with a DataError."""
    parsed = make_url(url)
    if parsed.get_driver_name() != "psycopg":  # libpq's parameters: another driver refuses them
        return {}
    query = parsed.query
    keepalives = {k: v for k, v in PG_KEEPALIVES.items() if k not in query}
    if os.environ.get(PG_SESSION_SETTINGS_ENV, "").lower() in ("off", "0", "no", "false"):
        return keepalives  # a pooler that refuses `options` (PgBouncer): set them on the role
    given = query.get("options") or os.environ.get("PGOPTIONS", "")
    if not isinstance(given, str):  # `options` named twice in the URL: libpq takes the last
        given = given[-1]
    ours = (
        f"-c lock_timeout={PG_LOCK_TIMEOUT_MS} "
        f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_MS}"
    )
    args = {"options": " ".join(part for part in (ours, given, "-c TimeZone=UTC") if part)}
    args.update(keepalives)
    return args


MIGRATION_LOCK = 0x6175746F676C6D  # "autoglm": PostgreSQL's advisory lock key for migrations
ROLLOUT_LOCK = 0x726F6C6C6F7574  # "rollout": one rollout created at a time across replicas
# Ids per IN (...) list: a statement's bound parameters stay far under SQLite's limit (32,766)
# and psycopg's (65,535) however many devices a call names.
ID_CHUNK = 500


def id_chunks(ids: Sequence[T]) -> Iterator[Sequence[T]]:
    """`ids` in slices of at most ID_CHUNK, for one IN (...) list each."""
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]


def migrate(engine: Engine, target: str = "head") -> None:
    """Brings the schema to the newest migration (or `target`), all in one transaction. On
    PostgreSQL one process at a time: replicas and `--workers` start together, and a second
    upgrade running the same DDL beside the first fails; after waiting, it finds the schema
    new and does nothing. A failure says which step failed and the database's message
    (`migration_error`)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    applied: list[str] = []
    cfg.attributes["on_version_apply"] = lambda step, **_: applied.append(step.up_revision_id)
    pending: list[str] = []
    step = "connecting"
    try:
        with engine.connect() as conn:
            step = "beginning the schema check"
            with conn.begin():
                if conn.dialect.name == "postgresql":  # held until this transaction ends
                    # Waiting out another process's migrations, and the tables' locks for
                    # the DDL, as long as they take: not the sessions' PG_LOCK_TIMEOUT_MS.
                    conn.execute(text("SET LOCAL lock_timeout = 0"))
                    step = "waiting for the other processes' migrations"
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                    )
                step = "reading the schema version"
                current = MigrationContext.configure(conn).get_current_heads()
                pending = [r.revision for r in script.iterate_revisions(target, current or "base")]
                pending.reverse()  # in the order they run
                step = ""  # the migrations: which one, from `applied`
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, target)
                step = "committing the migrations"
    except (DBAPIError, DisconnectionError) as exc:
        if not step:
            failing = pending[len(applied)] if len(applied) < len(pending) else "?"
            rev = script.get_revision(failing) if failing != "?" else None
            step = f"migration {failing}" + (f" ({Path(rev.path).name})" if rev else "")
        raise migration_error(engine, step, exc) from exc
    except (RevisionError, CommandError) as exc:  # a schema version this code does not know
        where = engine.url.render_as_string(hide_password=True)
        raise FailedPrecondition(
            f"the database {where} cannot be brought to this version's schema: {exc} (was it "
            "migrated by a newer control plane? run that version, or restore a backup)"
        ) from None


def migration_error(
    engine: Engine, step: str, exc: DBAPIError | DisconnectionError
) -> AutoglmError:
    """What a failure while migrating means: the database could not be reached (opened);
    it was locked past the wait; it failed for now; or a statement failed that will fail
    again (a migration the database refuses), each naming the step and the database's
    message."""
    where = engine.url.render_as_string(hide_password=True)
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if _locked(orig):  # connecting too: SQLite's first connection sets the journal mode
        wait = f" {SQLITE_BUSY_TIMEOUT_S:g} s" if isinstance(orig, sqlite3.Error) else ""
        return Unavailable(
            f"the database {where} is locked by another connection: {step} waited{wait} "
            f"and gave up: {reason}; try again once it lets go"
        )
    if step == "connecting":
        return Unavailable(f"cannot open the database {where}: {reason}")
    if database_error(exc) is not None:
        return Unavailable(f"the database {where} failed while {step}: {reason}; try again")
    return FailedPrecondition(
        f"the database {where} cannot be brought to this version's schema: {step} failed: "
        f"{reason} (the migrations were rolled back)"
    )


def _locked(orig: BaseException) -> bool:
    """Whether the database refused for a lock another connection holds."""
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return getattr(orig, "sqlstate", None) in ("55P03", "57014")  # lock_timeout, statement_timeout


class SqlBase:
    """What the table groups share: the session factory and the device lookup."""

    _sessions: sessionmaker[Session]
    _read_sessions: sessionmaker[Session]  # bound to the engine with READ_ONLY set

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """One transaction; the database failing under it is an error of the hierarchy."""
        with _mapped_errors(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read_tx(self) -> Iterator[Session]:
        """One transaction that only reads: on SQLite it takes no write lock (a write in it
        would take the lock mid-way, without waiting its turn: use `_tx` for those). The
        same as `_tx` on PostgreSQL."""
        with _mapped_errors(), self._read_sessions.begin() as session:
            yield session

    def _device_row(self, s: Session, id_or_name: str, for_update: bool = False) -> DeviceRow:
        # By id first: what certificates and the agents' calls name (a primary-key read,
        # a fraction of the cost of building the either-or query each session setup made).
        row = s.get(DeviceRow, id_or_name, with_for_update=for_update or None)
        if row is not None:
            return row
        query = select(DeviceRow).where(DeviceRow.name == id_or_name)
        if for_update:
            query = query.with_for_update()
        row = s.scalars(query).first()
        if row is None:
            raise NotFound(f"no device with id or name '{id_or_name}'")
        return row


# PostgreSQL's SQLSTATEs for a transaction it aborted to let another go on: a deadlock and a
# serialization failure. The same transaction run again may succeed.
_ABORTED = {"40P01": "a deadlock", "40001": "a serialization failure"}
# PostgreSQL's SQLSTATEs of a database that cannot serve now but may soon: a connection
# exception (class 08), insufficient resources (53: disk full, out of memory, too many
# connections), a shutdown or restart under way (57P01-57P03), a statement cancelled by its
# timeout (57014), a lock not had in time (55P03) and a session the server ended for idling
# inside its transaction (25P03: this process stopped past PG_IDLE_IN_TRANSACTION_MS).
_PG_TRANSIENT_CLASSES = ("08", "53")
_PG_TRANSIENT = {"57P01", "57P02", "57P03", "57014", "55P03", "25P03"}
# SQLite's primary result codes of the same kind: busy and locked (another writer past the busy
# timeout), an I/O error, a full disk, a file it cannot open. The rest (SQLITE_ERROR: no such
# table or column, a syntax error, too many SQL variables) come back the same every time.
_SQLITE_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
}


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """The database failing under the block as an error of the hierarchy, where it is one."""
    try:
        yield
    except (OperationalError, InterfaceError, InternalError, DisconnectionError) as exc:
        error = database_error(exc)
        if error is None:
            raise  # a bug or a request the database can never take: INTERNAL, traced
        raise error from exc
    except PoolTimeout as exc:  # every connection held (by callers waiting out a lock)
        raise Unavailable(
            "the database cannot be used now: no connection came free in time; try again"
        ) from exc


def database_error(exc: DBAPIError | DisconnectionError) -> AutoglmError | None:
    """What a failed database call means to a caller: Conflict for a transaction the database
    aborted for another's sake, Unavailable for one it cannot reach or could not lock in time
    (a restart, a failover, SQLite's busy timeout); both are worth retrying. None for the
    rest (a missing table, a syntax error, too many parameters): the same call fails the same
    way again, a bug to report with its traceback, not a retry. The driver's message only:
    the statement and its parameters stay out of what callers are told."""
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    sqlstate = getattr(orig, "sqlstate", None) or ""
    aborted = _ABORTED.get(sqlstate)
    if aborted:
        return Conflict(f"the database aborted this transaction ({aborted}); try again: {reason}")
    if sqlstate == "55P03":
        return Unavailable(
            "the database cannot be used now: a row or lock this needs is held by another "
            "connection past the lock timeout (another replica busy, or stopped inside a "
            f"transaction until the database ends it); try again: {reason}"
        )
    if _transient(exc, orig):
        return Unavailable(f"the database cannot be used now; try again: {reason}")
    return None


def _transient(exc: DBAPIError | DisconnectionError, orig: BaseException) -> bool:
    """Whether the failure is the database's state, not the statement's."""
    if isinstance(exc, DisconnectionError):  # the pool's own: a connection found dead
        return True
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_TRANSIENT  # extended codes too
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_PG_TRANSIENT_CLASSES) or sqlstate in _PG_TRANSIENT
    # No SQLSTATE: the server sent no answer. Transient where the connection was lost (the
    # dialect saw it broken) or never made (no statement yet: connecting failed); not where
    # the client library refused the statement (psycopg's "number of parameters must be
    # between 0 and 65535", an OperationalError too, on a connection that stays fine).
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, DBAPIError) and exc.statement is None


def new_device_row(
    name: str, labels: Mapping[str, str], profile: str, now: dt.datetime
) -> DeviceRow:
    """A device registered now, not enrolled yet."""
    return DeviceRow(
        id=str(uuid.uuid4()),
        name=name,
        labels=dict(labels),
        profile=profile,
        state=DeviceState.PENDING.value,
        created_at=now,
        revoked_reason="",
        cert_serial="",
        cert_fingerprint="",
        session_open=False,
        agent_version="",
        status={},
        host={},
    )


def _device(row: DeviceRow) -> DeviceRecord:
    return DeviceRecord(
        id=row.id,
        name=row.name,
        labels=dict(row.labels),
        profile=row.profile,
        state=DeviceState(row.state),
        created_at=row.created_at,
        enrolled_at=row.enrolled_at,
        revoked_at=row.revoked_at,
        revoked_reason=row.revoked_reason,
        cert_serial=row.cert_serial,
        cert_fingerprint=row.cert_fingerprint,
        cert_not_after=row.cert_not_after,
        previous_fingerprint=row.previous_fingerprint or "",
        previous_valid_until=row.previous_valid_until,
        last_seen=row.last_seen,
        session_open=row.session_open,
        agent_version=row.agent_version,
        status=dict(row.status or {}),
        host=dict(row.host or {}),
    )
