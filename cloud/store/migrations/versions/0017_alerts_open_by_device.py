"""The open alerts of the devices in a batch are counted (cloud/store/sql_alerts.py) for each
batch with alert events, under the fleet-wide alert lock: a partial index on device_id over
the open ones only, instead of ix_alerts_device_id and every alert a device ever raised.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

OPEN = sa.text("open_key IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_alerts_open_device",
        "alerts",
        ["device_id"],
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_alerts_open_device", table_name="alerts")
