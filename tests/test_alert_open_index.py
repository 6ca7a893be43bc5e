"""The open alerts of a batch's devices are counted under the fleet-wide alert lock for each
batch with alert events: the count reads a partial index over the open alerts only, not
ix_alerts_device_id and every alert a device ever raised (SQLite's plan; PostgreSQL has the
index from the same migration)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from cloud.store import open_store
from cloud.store.sql_alerts import open_counts


def test_counting_open_alerts_uses_the_partial_index_on_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        query = open_counts(["d1", "d2"]).compile(
            store.engine, compile_kwargs={"literal_binds": True}
        )
        with store.engine.connect() as conn:
            plan = [str(r[-1]) for r in conn.execute(text(f"EXPLAIN QUERY PLAN {query}"))]
    finally:
        store.close()
    assert any("ix_alerts_open_device" in step for step in plan), plan


def test_postgresql_has_the_partial_index(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        with store.engine.connect() as conn:
            found = conn.execute(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_alerts_open_device'")
            ).scalar()
    finally:
        store.close()
    assert found is not None and "open_key IS NOT NULL" in found, found
