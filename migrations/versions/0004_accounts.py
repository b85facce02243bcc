"""Accounts: session versions, disabled users, one login throttle for names that exist or not.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The per-user lock-out columns go: failures are now counted per name and per address in
``login_throttle`` for every name, so a lock-out no longer tells which names exist.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("session_version", sa.Integer, nullable=False, server_default="0"))
    op.add_column("users", sa.Column("disabled_at", sa.DateTime))
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it), not batch mode: batch would
    # rebuild ``users`` with DROP TABLE, and with foreign keys on that cascades into api_tokens.
    op.drop_column("users", "failed_logins")
    op.drop_column("users", "locked_until")
    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_failure_at", sa.DateTime, nullable=False),
        sa.Column("locked_until", sa.DateTime),
    )
    op.create_index("ix_login_throttle_last_failure_at", "login_throttle", ["last_failure_at"])


def downgrade():
    op.drop_table("login_throttle")
    op.add_column("users", sa.Column("locked_until", sa.DateTime))
    op.add_column("users", sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"))
    op.drop_column("users", "disabled_at")
    op.drop_column("users", "session_version")
