"""Alembic environment: runs on the connection the store hands over in `config.attributes`."""

from alembic import context

from cloud.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    # The store's note of each migration applied: a failure names the one that failed.
    on_version_apply=context.config.attributes.get("on_version_apply"),
)
with context.begin_transaction():
    context.run_migrations()
