"""One session per device across replicas: each session opened takes the device's next
generation here, and its replacements are counted (cloud/session_claims.py).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_sessions",
        sa.Column(
            "device_id",
            sa.String(36),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("replica", sa.String(200), nullable=False),
        sa.Column("peer", sa.String(300), nullable=False),
        sa.Column("replaced_at", sa.JSON(), nullable=False),
        sa.Column("flapping_at", sa.Float(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("device_sessions")
