"""Window captures: raw aligned windows devices sync for retraining (issue 21).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_captures",
        sa.Column(
            "device_id",
            sa.String(36),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("sequence", sa.BigInteger(), primary_key=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("asset", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("alert_key", sa.String(128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("period_s", sa.Float(), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("sensors", sa.JSON(), nullable=False),
        sa.Column("values", sa.LargeBinary(), nullable=False),
        sa.Column("mask", sa.LargeBinary(), nullable=False),
        sa.Column("input_center", sa.JSON(), nullable=False),
        sa.Column("input_scale", sa.JSON(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_window_captures_alert_key", "window_captures", ["alert_key"])
    op.create_index("ix_window_captures_window_end", "window_captures", ["window_end"])


def downgrade() -> None:
    op.drop_index("ix_window_captures_window_end", table_name="window_captures")
    op.drop_index("ix_window_captures_alert_key", table_name="window_captures")
    op.drop_table("window_captures")
