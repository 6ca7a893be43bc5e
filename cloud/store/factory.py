"""Opens the store a database URL names."""

from __future__ import annotations

from cloud.store.base import Store
from edge_agent.errors import ConfigError


def open_store(url: str, run_migrations: bool = True) -> Store:
    """SQLite (`sqlite:///path`) or PostgreSQL (`postgresql://...`), schema migrated to head."""
    if not url.startswith(("sqlite", "postgresql", "postgres://")):
        raise ConfigError(
            f"database_url '{url}' is not supported: use sqlite:///PATH or postgresql://..."
        )
    from cloud.store.sql import SqlStore

    return SqlStore(url, run_migrations=run_migrations)
