"""The control plane's state, behind the `Store` interface (SQLite or PostgreSQL)."""

from cloud.store.base import Store
from cloud.store.factory import open_store

__all__ = ["Store", "open_store"]
