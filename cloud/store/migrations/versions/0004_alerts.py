"""Alerts grouped from edge alert events, and their revision counter.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "device_id",
            sa.String(36),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("asset", sa.String(64), nullable=False),
        sa.Column("fault", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("open_key", sa.String(240), nullable=True, unique=True),
        sa.Column("revision", sa.BigInteger(), nullable=False, unique=True),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False, index=True),
        sa.Column("resolved_at", UTCDateTime(), nullable=True),
        sa.Column("doc", sa.JSON(), nullable=False),
    )
    revisions = op.create_table(
        "alert_revision",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(revisions, [{"id": 1, "value": 0}])


def downgrade() -> None:
    op.drop_table("alert_revision")
    op.drop_table("alerts")
