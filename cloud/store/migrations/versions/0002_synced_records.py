"""Predictions and alert events synced from devices, and each device's sync position.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _device_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "device_id",
        sa.String(36),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    )


def upgrade() -> None:
    op.create_table(
        "predictions",
        _device_fk(),
        sa.Column("sequence", sa.BigInteger(), primary_key=True),
        sa.Column("asset", sa.String(64), nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False, index=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("anomalous", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("contributions", sa.JSON(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "alert_events",
        _device_fk(),
        sa.Column("sequence", sa.BigInteger(), primary_key=True),
        sa.Column("alert_key", sa.String(128), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("asset", sa.String(64), nullable=False),
        sa.Column("fault", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("top_sensors", sa.JSON(), nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("raised_at", UTCDateTime(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False, index=True),
    )
    op.create_table(
        "device_sync",
        _device_fk(),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("device_sync")
    op.drop_table("alert_events")
    op.drop_table("predictions")
