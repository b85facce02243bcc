"""Rollout policies, schedules and reverts: host labels, a rollout's strategy, maintenance windows.

- ``hosts.labels``: ``{"key": "value"}`` labels a rollout selects hosts by.
- ``fleet_updates``: what the rollout selected (``selector``), its strategy (``canary``,
  ``canary_soak_s``, ``max_in_flight``, ``max_failures``, ``wave_soak_s``, ``offline``,
  ``offline_deadline_s``), its control state (``paused_at``/``paused_by``, ``hold_until`` for a
  soak between waves), its schedule (``start_at``, ``start_tz``, ``started_at``,
  ``respect_windows``), ``revert_on_halt``, and what it is (``kind``: update, retry or revert, of
  ``parent_id``). A ``scheduled`` status for a rollout that has not started yet.
- ``fleet_update_hosts``: the ``wave`` a host is in, the version it ran before (``from_version``),
  its own ``target_version`` (a revert takes each host back to where it was), and since when a
  host the rollout waits for has been offline (``waiting_since``).
- ``maintenance_windows``: named weekly windows that apply to hosts by labels.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

OLD_FLEET_STATUSES = "status IN ('running', 'succeeded', 'halted', 'cancelled')"
NEW_FLEET_STATUSES = "status IN ('scheduled', 'running', 'succeeded', 'halted', 'cancelled')"


def _check_name(table: str) -> str:
    # 0003 named it explicitly; the naming convention may have doubled it (see 0007).
    inspector = sa.inspect(op.get_bind())
    for ck in inspector.get_check_constraints(table):
        if ck.get("name") in (f"ck_{table}_status", f"ck_{table}_ck_{table}_status"):
            return ck["name"]
    return f"ck_{table}_status"


def _rollout_rows() -> list:
    # Rebuilding ``fleet_updates`` on SQLite is a DROP TABLE, which (foreign keys on) cascades to
    # every rollout row; keep them aside and put back whatever the rebuild took.
    return [dict(r._mapping) for r in op.get_bind().execute(sa.text("SELECT * FROM fleet_update_hosts")).all()]


def _restore_rollout_rows(rows: list) -> None:
    bind = op.get_bind()
    table = sa.Table("fleet_update_hosts", sa.MetaData(), autoload_with=bind)
    present = {r[0] for r in bind.execute(sa.text("SELECT id FROM fleet_update_hosts")).all()}
    missing = [r for r in rows if r["id"] not in present]
    if missing:
        bind.execute(table.insert(), missing)


def _rebuild_fleet_updates(check: str, add: bool) -> None:
    rows = _rollout_rows()
    name = _check_name("fleet_updates")
    with op.batch_alter_table("fleet_updates", recreate="auto") as batch:
        batch.drop_constraint(op.f(name), type_="check")
        batch.create_check_constraint(op.f("ck_fleet_updates_status"), check)
        if add:
            for col in _fleet_columns():
                batch.add_column(col)
            batch.create_foreign_key(
                op.f("fk_fleet_updates_parent_id_fleet_updates"),
                "fleet_updates",
                ["parent_id"],
                ["id"],
                ondelete="SET NULL",
            )
        else:
            batch.drop_constraint(op.f("fk_fleet_updates_parent_id_fleet_updates"), type_="foreignkey")
            for col in reversed(_fleet_columns()):
                batch.drop_column(col.name)
    _restore_rollout_rows(rows)


def _fleet_columns() -> list[sa.Column]:
    return [
        sa.Column("selector", sa.JSON, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("canary", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("canary_soak_s", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("max_in_flight", sa.String(16), nullable=False, server_default="1"),
        sa.Column("max_failures", sa.String(16), nullable=False, server_default="0"),
        sa.Column("wave_soak_s", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("offline", sa.String(8), nullable=False, server_default="halt"),
        sa.Column("offline_deadline_s", sa.Float),
        sa.Column("paused_at", sa.DateTime),
        sa.Column("paused_by", sa.String(128)),
        sa.Column("hold_until", sa.DateTime),
        sa.Column("start_at", sa.DateTime),
        sa.Column("start_tz", sa.String(64)),
        sa.Column("started_at", sa.DateTime),
        sa.Column("respect_windows", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("revert_on_halt", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("kind", sa.String(16), nullable=False, server_default="update"),
        sa.Column("parent_id", sa.Integer),
    ]


def _host_row_columns() -> list[sa.Column]:
    return [
        sa.Column("wave", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("from_version", sa.String(128)),
        sa.Column("target_version", sa.String(128)),
        sa.Column("waiting_since", sa.DateTime),
    ]


def upgrade():
    op.add_column("hosts", sa.Column("labels", sa.JSON, nullable=False, server_default=sa.text("'{}'")))
    for col in _host_row_columns():
        op.add_column("fleet_update_hosts", col)
    _rebuild_fleet_updates(NEW_FLEET_STATUSES, add=True)
    # A rollout started before this migration ran from the first wave's hosts, each its own wave.
    op.execute("UPDATE fleet_update_hosts SET wave = position")
    op.execute("UPDATE fleet_updates SET started_at = created_at")
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("days", sa.JSON, nullable=False),
        sa.Column("start", sa.String(5), nullable=False),
        sa.Column("end", sa.String(5), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", name=op.f("uq_maintenance_windows_name")),
    )


def downgrade():
    op.drop_table("maintenance_windows")
    op.execute("DELETE FROM fleet_updates WHERE status = 'scheduled'")
    _rebuild_fleet_updates(OLD_FLEET_STATUSES, add=False)
    for col in reversed(_host_row_columns()):
        op.drop_column("fleet_update_hosts", col.name)
    op.drop_column("hosts", "labels")
