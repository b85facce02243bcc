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
