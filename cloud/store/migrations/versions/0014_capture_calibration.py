"""Window captures keep the rest of the site calibration they were scored under, so the
cloud can recompute the decision's evidence (issue 21); NULL for older captures.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("window_captures", sa.Column("calibration", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("window_captures") as batch:
        batch.drop_column("calibration")
