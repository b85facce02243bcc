"""A rollout row records the maintenance window its host waited for, and since when.

``waiting_since`` is the offline wait (``offline=wait`` counts its deadline from it); a host held
back by ``respect_windows`` gets ``window_waiting_since`` and ``window_name`` instead, so the run
report can say which hosts waited for which window, and how long.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade():
    # Plain ADD COLUMN (nullable, no default): no table rebuild on SQLite.
    op.add_column("fleet_update_hosts", sa.Column("window_waiting_since", sa.DateTime))
    op.add_column("fleet_update_hosts", sa.Column("window_name", sa.String(100)))


def downgrade():
    op.drop_column("fleet_update_hosts", "window_name")
    op.drop_column("fleet_update_hosts", "window_waiting_since")
