"""Operator roles and the audit log of every mutating operator call.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operators") as batch:
        # Operators from before roles were all-powerful: they stay admins.
        batch.add_column(sa.Column("role", sa.String(16), nullable=False, server_default="admin"))
    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", UTCDateTime(), nullable=False, index=True),
        sa.Column("operator", sa.String(128), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(1024), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    with op.batch_alter_table("operators") as batch:
        batch.drop_column("role")
