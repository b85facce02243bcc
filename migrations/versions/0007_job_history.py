"""Job history outlives its host: jobs and rollout rows keep the host's name; a `cancelled` job status.

Deleting a host used to delete its jobs (and its rollout rows) with it, so a running update
vanished from the record. Now ``host_id`` is set to NULL instead and the name is kept beside it;
an update interrupted by the deletion ends ``cancelled``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

OLD_JOB_STATUSES = "status IN ('running', 'succeeded', 'failed')"
NEW_JOB_STATUSES = "status IN ('running', 'succeeded', 'failed', 'cancelled')"


def _keep_host_rows(table: str, ondelete: str, nullable: bool, job_check: str | None) -> None:
    with op.batch_alter_table(table, recreate="auto") as batch:
        if nullable:
            batch.add_column(sa.Column("host_name", sa.String(128)))
        batch.drop_constraint(op.f(f"fk_{table}_host_id_hosts"), type_="foreignkey")
        batch.alter_column("host_id", existing_type=sa.Integer, nullable=nullable)
        batch.create_foreign_key(op.f(f"fk_{table}_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete=ondelete)
        if not nullable:
            batch.drop_column("host_name")
        if job_check is not None:
            # 0001 named it through the naming convention a second time: ck_jobs_ck_jobs_status
            batch.drop_constraint(op.f(_status_check_name()), type_="check")
            batch.create_check_constraint(op.f("ck_jobs_status"), job_check)


def _status_check_name() -> str:
    inspector = sa.inspect(op.get_bind())
    for ck in inspector.get_check_constraints("jobs"):
        if ck.get("name") in ("ck_jobs_status", "ck_jobs_ck_jobs_status"):
            return ck["name"]
    return "ck_jobs_ck_jobs_status"


def _job_links() -> list:
    return op.get_bind().execute(sa.text("SELECT id, job_id FROM fleet_update_hosts WHERE job_id IS NOT NULL")).all()


def _restore_job_links(links) -> None:
    # SQLite's batch mode rebuilds ``jobs`` with DROP TABLE, which (foreign keys on) sets every
    # rollout row's job_id to NULL; put the links back once ``jobs`` holds the same ids again.
    for row_id, job_id in links:
        op.get_bind().execute(
            sa.text("UPDATE fleet_update_hosts SET job_id = :job WHERE id = :id"), {"job": job_id, "id": row_id}
        )


def upgrade():
    links = _job_links()
    _keep_host_rows("jobs", "SET NULL", True, NEW_JOB_STATUSES)
    _keep_host_rows("fleet_update_hosts", "SET NULL", True, None)
    _restore_job_links(links)
    for table in ("jobs", "fleet_update_hosts"):
        op.execute(f"UPDATE {table} SET host_name = (SELECT name FROM hosts WHERE hosts.id = {table}.host_id)")


def downgrade():
    # Rows of deleted hosts cannot point at a host again; the old schema had no place for them.
    op.execute("DELETE FROM fleet_update_hosts WHERE host_id IS NULL")
    op.execute("DELETE FROM jobs WHERE host_id IS NULL")
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'cancelled'")
    links = _job_links()
    _keep_host_rows("fleet_update_hosts", "CASCADE", False, None)
    _keep_host_rows("jobs", "CASCADE", False, OLD_JOB_STATUSES)
    _restore_job_links(links)
