"""Desired states remember an aborted rollout's version (`revert_version`).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("desired_models") as batch:
        batch.add_column(
            sa.Column("revert_version", sa.String(64), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("desired_models") as batch:
        batch.drop_column("revert_version")
