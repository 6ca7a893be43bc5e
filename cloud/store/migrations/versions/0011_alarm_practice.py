"""Alarm practice: webhook kinds and secret rotation, maintenance windows, an index for the
delivery outbox's per-webhook-and-alert queries.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        # Webhooks from before kinds signed with our own headers; they now sign the Standard
        # Webhooks way with the same secret.
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="standard")
        )
        batch.add_column(sa.Column("previous_secret", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("previous_until", UTCDateTime(), nullable=True))
    op.create_index("ix_deliveries_webhook_alert", "deliveries", ["webhook_id", "alert_id", "id"])
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("selector", sa.Text(), nullable=False),
        sa.Column("asset", sa.String(64), nullable=False),
        sa.Column("starts_at", UTCDateTime(), nullable=False),
        sa.Column("ends_at", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("maintenance_windows")
    op.drop_index("ix_deliveries_webhook_alert", table_name="deliveries")
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("previous_until")
        batch.drop_column("previous_secret")
        batch.drop_column("kind")
