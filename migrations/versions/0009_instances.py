"""Server instances: each ``serve`` process on PostgreSQL registers itself; a host names the one holding its socket.

``instances`` has one row per live process (its heartbeat is ``heartbeat_at``, the database's
clock); ``hosts.instance_id`` says which instance holds the host's agent socket (NULL: none, or
the single-process SQLite mode, which never writes it). An instance whose heartbeat expired is
deleted and its hosts are set offline (the same sweep clears their pointer).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("agent_addr", sa.String(255)),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False, index=True),
    )
    # A plain ADD COLUMN, no foreign key: on SQLite a key means a batch rebuild of ``hosts``, whose
    # DROP TABLE (foreign keys on) would null every job's host and delete every host's alerts. The
    # sweep that deletes an expired instance clears its hosts' pointer in the same statement.
    op.add_column("hosts", sa.Column("instance_id", sa.Integer))
    op.create_index(op.f("ix_hosts_instance_id"), "hosts", ["instance_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_hosts_instance_id"), "hosts")
    op.drop_column("hosts", "instance_id")
    op.drop_table("instances")
