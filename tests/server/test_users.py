"""``User.create``: the one way accounts are made (CLI, demo, test personas), validated and audited."""

import pytest
import sqlalchemy as sa

from app.cli import COMMANDS
from app.extensions import db
from app.models import AuditEvent, User


def _audit():
    return db.session.execute(sa.select(AuditEvent.actor, AuditEvent.action, AuditEvent.target)).all()


def test_create_adds_a_user_with_a_hashed_password_and_audits_only_with_an_actor(app):
    quiet = User.create("quiet", "long-enough-1", "viewer")
    loud = User.create("loud", "long-enough-2", "admin", actor="cli")
    db.session.commit()
    assert quiet.check_password("long-enough-1") and "long-enough-1" not in quiet.password_hash
    assert (quiet.role, loud.role) == ("viewer", "admin")
    assert _audit() == [("cli", "user.created", "loud")]
    assert db.session.scalar(sa.select(AuditEvent.details)) == {"role": "admin"}


@pytest.mark.parametrize(
    "username, password, role, message",
    [
        ("bob", "short", "viewer", "at least 8 characters"),
        ("bob", "long-enough-1", "root", "unknown role 'root'"),
        ("", "long-enough-1", "viewer", "1 to 64 characters"),
        ("b" * 65, "long-enough-1", "viewer", "1 to 64 characters"),
        ("taken", "long-enough-1", "viewer", "user 'taken' already exists"),
    ],
)
def test_create_refuses_bad_input_and_adds_nothing(app, username, password, role, message):
    User.create("taken", "long-enough-0")
    db.session.commit()
    with pytest.raises(ValueError, match=message):
        User.create(username, password, role, actor="cli")
    db.session.commit()
    assert db.session.scalars(sa.select(User.username)).all() == ["taken"]
    assert _audit() == []


def test_set_password_refuses_a_short_one_and_keeps_the_old(app):
    user = User.create("carol", "first-pass-1")
    with pytest.raises(ValueError, match="at least 8 characters"):
        user.set_password("short")
    assert user.check_password("first-pass-1")


def test_register_cli_adds_every_module_level_command_to_the_app(app, runner):
    assert {c.name for c in COMMANDS} <= set(app.cli.commands)
    r = runner.invoke(args=["users", "create", "dave", "--role", "admin", "--password-stdin"], input="long-enough-1\n")
    assert r.exit_code == 0, r.output
    assert User.by_username("dave").is_admin and _audit() == [("cli", "user.created", "dave")]
    r = runner.invoke(args=["users", "create", "erin", "--password-stdin"], input="short\n")
    assert r.exit_code == 2 and "at least 8 characters" in r.output  # a usage error, as before
    assert User.by_username("erin") is None
