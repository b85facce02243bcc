"""The schema comes from the migrations, and its guards hold in the database itself."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import Alert, AuditEvent, FleetUpdate, Host, Job, User


def test_the_migrations_build_exactly_the_models_schema(app):
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, db.metadata)
    assert diff == [], f"models and migrations disagree (a migration is missing?): {diff}"


def test_the_role_check_constraint_is_enforced(app):
    db.session.add(User(username="x", password_hash="h", role="root"))
    with pytest.raises(IntegrityError):
        db.session.commit()


def test_job_kind_and_status_are_constrained(app, cast):
    db.session.add(Job(host_id=cast.host_online.id, kind="reboot", status="running", params={}))
    with pytest.raises(IntegrityError):
        db.session.commit()
    db.session.rollback()
    db.session.add(Job(host_id=cast.host_online.id, kind="update", status="paused", params={}))
    with pytest.raises(IntegrityError):
        db.session.commit()


def test_at_most_one_running_update_job_per_host(app, cast):
    h = cast.host_online.id
    db.session.add(Job(host_id=h, kind="update", status="running", params={}))
    db.session.commit()
    db.session.add(Job(host_id=h, kind="update", status="succeeded", params={}))
    db.session.commit()  # finished jobs don't count
    db.session.add(Job(host_id=h, kind="update", status="running", params={}))
    with pytest.raises(IntegrityError):
        db.session.commit()


def test_at_most_one_open_alert_per_kind_and_key(app):
    Alert.raise_or_touch("update_failed", "7", "first")
    db.session.commit()
    a = Alert.raise_or_touch("update_failed", "7", "second")
    db.session.commit()
    assert a.count == 2 and a.message == "second"
    db.session.add(Alert(kind="update_failed", dedup_key="7", message="dup"))
    with pytest.raises(IntegrityError):
        db.session.commit()
    db.session.rollback()
    assert Alert.resolve("update_failed", "7") == 1
    db.session.commit()
    fresh = Alert.raise_or_touch("update_failed", "7", "again")
    db.session.commit()
    assert fresh.id != a.id and fresh.count == 1


def test_at_most_one_running_fleet_update(app):
    db.session.add(FleetUpdate(target_version="2", status="running", created_by="a"))
    db.session.commit()
    db.session.add(FleetUpdate(target_version="2", status="running", created_by="b"))
    with pytest.raises(IntegrityError):
        db.session.commit()


def test_the_audit_log_is_append_only(app):
    AuditEvent.record("admin", "auth.login", "admin")
    db.session.commit()
    with pytest.raises(sa.exc.DatabaseError):
        db.session.execute(sa.update(AuditEvent).values(actor="mallory"))
        db.session.commit()
    db.session.rollback()
    with pytest.raises(sa.exc.DatabaseError):
        db.session.execute(sa.delete(AuditEvent))
        db.session.commit()
    db.session.rollback()
    assert db.session.scalar(sa.select(AuditEvent.actor)) == "admin"


def test_host_names_are_unique(app):
    Host.enrol("a")
    db.session.commit()
    Host.enrol("a")
    with pytest.raises(IntegrityError):
        db.session.commit()


def test_migration_0004_keeps_users_and_their_api_tokens(tmp_path):
    """Upgrading a 0003 database with users and tokens loses neither (no table rebuild cascades)."""
    import flask_migrate

    from app import create_app
    from tests.support import dbsetup

    url = dbsetup.empty_database(str(tmp_path), "upgrade")
    other = create_app({"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": str(tmp_path / "i"), "SECRET_KEY": "x"}, {})
    with other.app_context():
        flask_migrate.upgrade(revision="0003")
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO users (id, username, password_hash, role, created_at, failed_logins, locked_until) "
                    "VALUES (7, 'old-admin', 'h', 'admin', '2026-01-01 00:00:00', 4, '2026-01-01 00:01:00')"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO api_tokens (id, user_id, name, prefix, token_hash, created_at) "
                    "VALUES (3, 7, 'ci', 'rmt_abc', 'hash-1', '2026-01-01 00:00:00')"
                )
            )
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, user_id FROM api_tokens")).all() == [(3, 7)]
            row = conn.execute(sa.text("SELECT username, session_version, disabled_at FROM users")).one()
            assert tuple(row) == ("old-admin", 0, None)
            cols = {c["name"] for c in sa.inspect(conn).get_columns("users")}
            assert "failed_logins" not in cols and "locked_until" not in cols
        flask_migrate.downgrade(revision="0003")
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM api_tokens")).scalar() == 1
        db.session.remove()
        db.engine.dispose()


def test_deleting_a_host_keeps_its_jobs_with_the_host_name(app, cast):
    h = cast.host_online
    db.session.add(Job(host_id=h.id, host_name=h.name, kind="update", status="cancelled", params={}))
    db.session.commit()
    db.session.execute(sa.delete(Host).where(Host.id == h.id))
    db.session.commit()
    job = db.session.scalar(sa.select(Job))
    assert (job.host_id, job.host_name, job.status) == (None, "web-1", "cancelled")


def test_migration_0007_keeps_jobs_rollout_rows_and_their_links(tmp_path):
    """Upgrading a 0006 database with jobs in a rollout loses no row and no job link (no rebuild cascades)."""
    import flask_migrate

    from app import create_app
    from tests.support import dbsetup

    url = dbsetup.empty_database(str(tmp_path), "jobhistory")
    other = create_app({"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": str(tmp_path / "i"), "SECRET_KEY": "x"}, {})
    t = "'2026-01-01 00:00:00'"
    with other.app_context():
        flask_migrate.upgrade(revision="0006")
        with db.engine.begin() as conn:
            for sql in (
                f"INSERT INTO hosts (id, name, capabilities, connected, created_at) VALUES (5, 'h5', '[]', false, {t})",
                "INSERT INTO jobs (id, host_id, kind, status, params, actor, created_at, updated_at) "
                f"VALUES ('j1', 5, 'update', 'running', '{{}}', 'a', {t}, {t})",
                "INSERT INTO fleet_updates (id, target_version, status, strategy, created_by, created_at) "
                f"VALUES (2, '2.0.0', 'running', 'rolling', 'a', {t})",
                "INSERT INTO fleet_update_hosts (id, fleet_update_id, host_id, position, status, job_id) "
                "VALUES (9, 2, 5, 0, 'running', 'j1')",
            ):
                conn.execute(sa.text(sql))
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, host_id, host_name FROM jobs")).all() == [("j1", 5, "h5")]
            rows = conn.execute(sa.text("SELECT id, host_id, host_name, job_id FROM fleet_update_hosts")).all()
            assert rows == [(9, 5, "h5", "j1")]
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM hosts"))
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT host_id, host_name FROM jobs")).all() == [(None, "h5")]
            assert conn.execute(sa.text("SELECT host_id, job_id FROM fleet_update_hosts")).all() == [(None, "j1")]
        flask_migrate.downgrade(revision="0006")
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 0  # a deleted host's history
        flask_migrate.upgrade()
        db.session.remove()
        db.engine.dispose()


def test_migration_0008_keeps_rollouts_and_their_host_rows(tmp_path):
    """Upgrading a 0007 database rebuilds ``fleet_updates`` (SQLite) without losing a rollout row."""
    import flask_migrate

    from app import create_app
    from tests.support import dbsetup

    url = dbsetup.empty_database(str(tmp_path), "policy")
    other = create_app({"SQLALCHEMY_DATABASE_URI": url, "INSTANCE_PATH": str(tmp_path / "i"), "SECRET_KEY": "x"}, {})
    t = "'2026-01-01 00:00:00'"
    with other.app_context():
        flask_migrate.upgrade(revision="0007")
        with db.engine.begin() as conn:
            for sql in (
                f"INSERT INTO hosts (id, name, capabilities, connected, created_at) VALUES (5, 'h5', '[]', false, {t})",
                "INSERT INTO fleet_updates (id, target_version, status, strategy, created_by, created_at) "
                f"VALUES (2, '2.0.0', 'halted', 'rolling', 'a', {t})",
                "INSERT INTO fleet_update_hosts (id, fleet_update_id, host_id, host_name, position, status) "
                "VALUES (9, 2, 5, 'h5', 3, 'failed')",
            ):
                conn.execute(sa.text(sql))
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, fleet_update_id, position, wave, status FROM fleet_update_hosts"))
            assert rows.all() == [(9, 2, 3, 3, "failed")]
            fu = conn.execute(sa.text("SELECT status, kind, max_failures, offline, started_at FROM fleet_updates"))
            assert [tuple(r[:4]) for r in fu.all()] == [("halted", "update", "0", "halt")]
            assert conn.execute(sa.text("SELECT labels FROM hosts")).scalar() in ({}, "{}")
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO fleet_updates (id, target_version, status, created_by, created_at) "
                    f"VALUES (3, '2.0.0', 'scheduled', 'a', {t})"
                )
            )
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO fleet_updates (id, target_version, status, created_by, created_at) "
                    f"VALUES (4, '2.0.0', 'paused', 'a', {t})"
                )
            )
        flask_migrate.downgrade(revision="0007")
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM fleet_updates")).all() == [(2,)]  # the scheduled one goes
            assert conn.execute(sa.text("SELECT id FROM fleet_update_hosts")).all() == [(9,)]
        flask_migrate.upgrade()
        db.session.remove()
        db.engine.dispose()
