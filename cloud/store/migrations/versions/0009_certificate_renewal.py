"""Certificate renewal: when each device's certificate expires, and the certificate it
renewed from, accepted until the end of a grace period.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

from cloud.store.tables import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("cert_not_after", UTCDateTime(), nullable=True))
        batch.add_column(
            sa.Column("previous_fingerprint", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("previous_valid_until", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("previous_valid_until")
        batch.drop_column("previous_fingerprint")
        batch.drop_column("cert_not_after")
