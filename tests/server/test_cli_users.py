"""``restic-manager users list|disable|enable|delete|set-role``, run as real processes, against a real server."""

from __future__ import annotations

import re

import pytest
import requests
import sqlalchemy as sa

from app.extensions import db
from app.models import ApiToken, AuditEvent, User
from tests.server.test_cli import cli
from tests.support.live import ServerProcess

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def env(tmp_path, database_url, app):
    return {
        "RM_INSTANCE_PATH": str(tmp_path / "cli-instance"),
        "RM_DATABASE_URL": database_url,
        "RM_SECRET_KEY": "k",
        "RM_VERSION": "2.0.0",
    }


def _user(name: str) -> User | None:
    db.session.rollback()
    return db.session.scalar(sa.select(User).where(User.username == name))


def _audited(action: str) -> list[tuple[str, str]]:
    db.session.rollback()
    q = sa.select(AuditEvent.actor, AuditEvent.target).where(AuditEvent.action == action)
    return [tuple(row) for row in db.session.execute(q)]


def test_users_list_shows_role_status_and_active_tokens(env, cast):
    ApiToken.issue(cast.viewer, "a")
    ApiToken.issue(cast.viewer, "b")
    cast.viewer.disable("test")
    db.session.commit()
    r = cli(["users", "list"], env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["admin"][2:] == ["admin", "enabled", "0"]
    assert rows["viewer"][2:] == ["viewer", "disabled", "2"]


def test_users_disable_enable_and_delete_are_audited(env, cast):
    r = cli(["users", "disable", "viewer"], env)
    assert r.returncode == 0 and r.stdout.strip() == "disabled viewer", r.stderr
    assert not _user("viewer").is_active
    assert cli(["users", "disable", "viewer"], env).stdout.strip() == "viewer was already disabled"
    r = cli(["users", "enable", "viewer"], env)
    assert r.returncode == 0 and _user("viewer").is_active
    ApiToken.issue(_user("viewer"), "script")
    db.session.commit()
    r = cli(["users", "delete", "viewer", "--yes"], env)
    assert r.returncode == 0, r.stderr
    assert _user("viewer") is None
    assert db.session.scalar(sa.select(sa.func.count(ApiToken.id))) == 0
    for action in ("user.disabled", "user.enabled", "user.deleted"):
        assert _audited(action) == [("cli", "viewer")], action


def test_users_delete_asks_first(env, cast):
    r = cli(["users", "delete", "viewer"], env, stdin="n\n")
    assert r.returncode != 0
    assert _user("viewer") is not None


def test_the_cli_refuses_to_disable_delete_or_demote_the_last_admin(env, cast):
    for args in (["disable", "admin"], ["delete", "admin", "--yes"], ["set-role", "admin", "viewer"]):
        r = cli(["users", *args], env)
        assert r.returncode == 1, args
        assert "it is the last enabled admin" in r.stderr, r.stderr
    u = _user("admin")
    assert u.is_active and u.role == "admin"
    assert cli(["users", "disable", "nobody"], env).stderr.strip() == "Error: no user 'nobody'"


def test_users_set_role_changes_the_role_and_audits_it(env, cast):
    r = cli(["users", "set-role", "viewer", "admin"], env)
    assert r.returncode == 0, r.stderr
    assert _user("viewer").role == "admin"
    assert _audited("user.role_changed") == [("cli", "viewer")]


def test_cli_changes_reach_a_running_server_at_once(tmp_path, env, cast):
    """The server is one process, the CLI another: sessions and tokens die by the database alone."""
    _, token = ApiToken.issue(cast.viewer, "script")
    db.session.commit()
    srv = ServerProcess(str(tmp_path / "srv"), env["RM_DATABASE_URL"], "2.0.0", {"RM_SECRET_KEY": "k"}).start()
    try:
        base = srv.admin_url
        browser = requests.Session()
        page = browser.get(base + "/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        r = browser.post(
            base + "/login",
            data={"username": "admin", "password": "admin-pass-123", "csrf_token": csrf},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 302
        thief = requests.Session()
        thief.cookies.update(browser.cookies)
        assert thief.get(base + "/api/version", timeout=10).status_code == 200

        assert (
            cli(["users", "set-password", "admin", "--password-stdin"], env, stdin="brand-new-pass-1\n").returncode == 0
        )
        assert thief.get(base + "/api/version", timeout=10).status_code == 401
        assert browser.get(base + "/", allow_redirects=False, timeout=10).status_code == 302

        bearer = {"Authorization": f"Bearer {token}"}
        assert requests.get(base + "/api/hosts", headers=bearer, timeout=10).status_code == 200
        assert cli(["users", "disable", "viewer"], env).returncode == 0
        assert requests.get(base + "/api/hosts", headers=bearer, timeout=10).status_code == 401
        assert cli(["users", "enable", "viewer"], env).returncode == 0
        assert requests.get(base + "/api/hosts", headers=bearer, timeout=10).status_code == 200
        assert cli(["users", "delete", "viewer", "--yes"], env).returncode == 0
        r = requests.get(base + "/api/hosts", headers=bearer, timeout=10)
        assert r.status_code == 401, r.text
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()
