"""Revisions: rollouts and their targets are written by compare-and-set on a revision, and
desired states carry the revision that replicas follow to deliver them (a change feed).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("rollouts", "rollout_targets", "desired_models"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0")
            )
    op.create_index("ix_desired_models_revision", "desired_models", ["revision"])
    counter = op.create_table(
        "desired_revision",
        sa.Column("id", sa.BigInteger(), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(counter, [{"id": 1, "value": 0}])


def downgrade() -> None:
    op.drop_table("desired_revision")
    op.drop_index("ix_desired_models_revision", "desired_models")
    for table in ("rollouts", "rollout_targets", "desired_models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("revision")
