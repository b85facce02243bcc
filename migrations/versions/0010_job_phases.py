"""When each phase of an update job began: ``job_phases`` (job_id, phase, at), one row per phase entered.

The watcher appends a row when an agent's ``update.progress`` moves a running job into a phase
it has not been in yet (``downloading``, ``verifying``, ``staging``, ``restarting``); the run
report (``app/updates/report.py``) turns them into each phase's time. A table rather than a JSON
column on ``jobs``: appending is one portable INSERT (no read-modify-write of a JSON document,
no SQLite/PostgreSQL JSON dialects), and a report over 1,000 hosts reads them with one indexed
query. Jobs from before this migration have no rows: their report says so.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "job_phases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", name=op.f("fk_job_phases_job_id_jobs"), ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    op.create_index(op.f("ix_job_phases_job_id"), "job_phases", ["job_id"])


def downgrade():
    op.drop_index(op.f("ix_job_phases_job_id"), table_name="job_phases")
    op.drop_table("job_phases")
