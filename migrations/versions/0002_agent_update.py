"""Agent self-update: releases, job progress, one running update job per host.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("phase", sa.String(32)))
        batch.add_column(sa.Column("bytes_done", sa.BigInteger))
        batch.add_column(sa.Column("bytes_total", sa.BigInteger))
    # Two simultaneous clicks must give one job: the database, not Python, has the last word.
    op.create_index(
        "uq_jobs_one_running_update",
        "jobs",
        ["host_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'update' AND status = 'running'"),
        postgresql_where=sa.text("kind = 'update' AND status = 'running'"),
    )
    op.create_table(
        "agent_releases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("platform", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("signature", sa.Text),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("version", "platform", name="uq_agent_releases_version_platform"),
    )


def downgrade():
    op.drop_table("agent_releases")
    op.drop_index("uq_jobs_one_running_update", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("bytes_total")
        batch.drop_column("bytes_done")
        batch.drop_column("phase")
