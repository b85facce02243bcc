"""Alerts can be acknowledged: who and when.

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    # Plain ADD COLUMN (nullable, no default): no table rebuild on SQLite.
    op.add_column("alerts", sa.Column("acknowledged_at", sa.DateTime))
    op.add_column("alerts", sa.Column("acknowledged_by", sa.String(128)))


def downgrade():
    op.drop_column("alerts", "acknowledged_by")
    op.drop_column("alerts", "acknowledged_at")
