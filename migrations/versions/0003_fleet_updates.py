"""Fleet rolling updates: at most one running rollout.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "fleet_updates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("target_version", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False, server_default="rolling"),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("halt_reason", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'halted', 'cancelled')", name="ck_fleet_updates_status"
        ),
    )
    op.create_index(
        "uq_fleet_updates_one_running",
        "fleet_updates",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "fleet_update_hosts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "fleet_update_id", sa.Integer, sa.ForeignKey("fleet_updates.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("host_id", sa.Integer, sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.UniqueConstraint("fleet_update_id", "host_id", name="uq_fleet_update_hosts_fleet_host"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')",
            name="ck_fleet_update_hosts_status",
        ),
    )
    op.create_index("ix_fleet_update_hosts_fleet_update_id", "fleet_update_hosts", ["fleet_update_id"])


def downgrade():
    op.drop_table("fleet_update_hosts")
    op.drop_table("fleet_updates")
