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
