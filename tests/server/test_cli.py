"""The command line. A few tests run the console script as an operator does (a real process with an
RM_* environment: migrations, serve, the demo, and CLI changes reaching a separately running server);
the rest run the same commands in this process through Flask's CLI runner, on the test's database."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys

import pytest
import requests
import sqlalchemy as sa

from app.extensions import db
from app.models import ApiToken, AuditEvent, Host, LoginThrottle, User
from app.timeutil import utcnow
from tests.conftest import TEST_PASSWORD_HASH_METHOD
from tests.support.live import ROOT, ServerProcess, product_env
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)


def cli(args, env, stdin=None, timeout=30):
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT,
        env=product_env(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path, database_url, app):
    """The environment of a real ``restic-manager`` process on the test's database. Its instance
    ``config.py`` sets the tests' cheap password hash (scrypt would cost each process ~0.1 s)."""
    instance = tmp_path / "cli-instance"
    instance.mkdir(exist_ok=True)
    (instance / "config.py").write_text(f"PASSWORD_HASH_METHOD = {TEST_PASSWORD_HASH_METHOD!r}\n")
    return {
        "RM_INSTANCE_PATH": str(instance),
        "RM_DATABASE_URL": database_url,
        "RM_SECRET_KEY": "k",
        "RM_VERSION": "2.0.0",
    }


class Ran:
    """What a command did, in the shape of :func:`subprocess.run`'s result."""

    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


@pytest.fixture
def run(runner):
    """Run a ``restic-manager`` command in this process (Flask's CLI runner, the test's app)."""

    def run(args, stdin=None):
        return Ran(runner.invoke(args=args, input=stdin, catch_exceptions=False))

    return run


def migrations_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", os.path.join(ROOT, "migrations"))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_db_upgrade_brings_an_empty_database_to_head(tmp_path):
    url = f"sqlite:///{tmp_path}/fresh.sqlite3"
    r = cli(["db", "upgrade"], {"RM_INSTANCE_PATH": str(tmp_path), "RM_DATABASE_URL": url})
    assert r.returncode == 0, r.stderr
    engine = sa.create_engine(url)
    assert {"users", "hosts", "jobs", "alerts", "audit_events", "fleet_updates", "agent_releases"} <= set(
        sa.inspect(engine).get_table_names()
    )
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == migrations_head()
    engine.dispose()


def test_users_create_reads_the_password_from_stdin(run):
    r = run(["users", "create", "alice", "--role", "admin", "--password-stdin"], stdin="correct-horse-1\n")
    assert r.returncode == 0, r.stderr
    db.session.rollback()
    u = db.session.scalar(sa.select(User).where(User.username == "alice"))
    assert u.role == "admin" and u.check_password("correct-horse-1")


def test_users_create_refuses_a_short_password_and_a_duplicate(run):
    r = run(["users", "create", "bob", "--password-stdin"], stdin="short\n")
    assert r.returncode != 0 and "at least 8 characters" in r.stderr
    run(["users", "create", "bob", "--password-stdin"], stdin="long-enough-1\n")
    r = run(["users", "create", "bob", "--password-stdin"], stdin="long-enough-1\n")
    assert r.returncode != 0 and "already exists" in r.stderr


def test_tokens_create_prints_a_token_that_the_api_accepts_once_stored_hashed(run):
    run(["users", "create", "ops", "--role", "admin", "--password-stdin"], stdin="long-enough-1\n")
    r = run(["tokens", "create", "--user", "ops"])
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("rmt_")
    db.session.rollback()
    assert ApiToken.lookup(token) is not None
    assert db.session.scalar(sa.select(sa.func.count()).where(ApiToken.token_hash == token)) == 0


def test_hosts_add_prints_the_agent_token_and_install_line(run):
    r = run(["hosts", "add", "web-9"])
    assert r.returncode == 0, r.stderr
    token = re.search(r"agent token: (\S+)", r.stdout).group(1)
    assert re.search(
        r"install: curl -fsSL http://127\.0\.0\.1:8081/agent/install\.sh \| sudo sh -s -- "
        r"--server ws://127\.0\.0\.1:8081 --token " + re.escape(token),
        r.stdout,
    )
    db.session.rollback()
    host = Host.by_token(token)
    assert host.name == "web-9"
    assert "host.enrolled" in db.session.scalars(sa.select(AuditEvent.action)).all()


def test_a_bad_environment_value_stops_start_up_with_a_message_naming_it(env, monkeypatch, capsys):
    """The console script's entry point (``main``), in this process: exit 2 and one line naming it."""
    from app.cli import main

    for name in [k for k in os.environ if k.startswith("RM_")]:
        monkeypatch.delenv(name)
    for name, value in {**env, "RM_UPDATE_TIMEOUT": "soon"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "false")  # main() sets it; restored after the test
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip() == "restic-manager: config error: RM_UPDATE_TIMEOUT='soon': expected a number"
    )


def test_build_agent_builds_the_artifact_claiming_the_given_version(run, tmp_path):
    out = tmp_path / "out"
    r = run(["build-agent", "--version", "9.9.9-smoke", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    path, size, digest = r.stdout.split()
    assert os.path.getsize(path) == int(size) and len(digest) == 64
    v = subprocess.run([sys.executable, path, "--version"], capture_output=True, text=True, timeout=30)
    assert v.stdout.strip() == "9.9.9-smoke"


def test_serve_runs_both_planes_and_stops_cleanly_on_sigterm(tmp_path, database_url, app):
    srv = ServerProcess(str(tmp_path / "srv"), database_url, "2.0.0").start()
    try:
        assert requests.get(srv.admin_url + "/login", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{srv.agent_port}/agent/health", timeout=5).json()["ok"]
        # A bound far from load noise; promptness is checked by what the stop did, not its duration:
        # the signal was seen, every step ran, and no plane thread's 2 s join was waited out.
        code = srv.stop(signal.SIGTERM, timeout=60)
        assert code == 0
        log = srv.log()
        assert "shutting down (signal 15)" in log and "stopped in " in log, log
        assert "did not end within" not in log, log
    finally:
        srv.kill()


def test_serve_registers_the_release_for_its_own_version(tmp_path, database_url, app):
    srv = ServerProcess(str(tmp_path / "srv"), database_url, "3.1.4").start()
    try:
        wait_until(
            lambda: os.path.exists(os.path.join(srv.instance_dir, "releases", "restic-manager-agent-3.1.4.pyz")), 5
        )
    finally:
        srv.stop()
    from app.updates import releases

    db.session.rollback()
    rel = releases.find("3.1.4")
    assert rel is not None and rel.size == os.path.getsize(rel.path)


def test_users_set_password_changes_it_and_lifts_a_lockout(run):
    run(["users", "create", "carol", "--password-stdin"], stdin="first-pass-1\n")
    db.session.rollback()
    locked_until = utcnow() + dt.timedelta(hours=1)
    db.session.add(LoginThrottle(key="name:carol", failures=0, last_failure_at=utcnow(), locked_until=locked_until))
    db.session.commit()
    r = run(["users", "set-password", "carol", "--password-stdin"], stdin="second-pass-2\n")
    assert r.returncode == 0, r.stderr
    db.session.rollback()
    u = db.session.scalar(sa.select(User).where(User.username == "carol"))
    assert u.check_password("second-pass-2") and db.session.get(LoginThrottle, "name:carol") is None


def test_demo_prints_where_to_log_in_and_its_agent_comes_online(tmp_path):
    from tests.support.live import LiveClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
    env.update(
        {
            "RM_INSTANCE_PATH": str(tmp_path / "demo"),
            "RM_HTTP_ADDR": "127.0.0.1:0",
            "RM_AGENT_ADDR": "127.0.0.1:0",
            # No RM_VERSION: the demo must work with whatever version this checkout builds as.
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        while not any(line.strip().startswith("login:") for line in lines):
            line = proc.stdout.readline()
            assert line, f"demo exited early: {lines}"
            lines.append(line)
        text = "".join(lines)
        url = re.search(r"open:\s+(http://\S+)/", text).group(1)
        password = re.search(r"login: admin / (\S+)", text).group(1)
        admin = LiveClient(url).login("admin", password)

        def demo_host():
            hosts = admin.get_json("/api/hosts")["hosts"]
            return hosts and hosts[0]["online"] and hosts[0]

        host = wait_until(demo_host, 30, 0.1, "the demo agent online")
        assert host["name"] == "demo-agent"
        assert host["agent_version"] == "0.0.0.dev0+demo" and host["version_state"] == "behind"
        assert "update" in host["capabilities"]
        # The demo's point: one click updates the agent (a signed release, verified by the agent).
        r = admin.post_json(f"/api/hosts/{host['id']}/update")
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        job = wait_until(
            lambda: (j := admin.get_json(f"/api/jobs/{job_id}")["job"])["status"] != "running" and j,
            30,
            0.05,
            "the demo update",
        )
        assert job["status"] == "succeeded", job
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- users list|disable|enable|delete|set-role ------------------------------------------------


def _user_named(name: str) -> User | None:
    db.session.rollback()
    return db.session.scalar(sa.select(User).where(User.username == name))


def _audited(action: str) -> list[tuple[str, str]]:
    db.session.rollback()
    q = sa.select(AuditEvent.actor, AuditEvent.target).where(AuditEvent.action == action)
    return [tuple(row) for row in db.session.execute(q)]


def test_users_list_shows_role_status_and_active_tokens(run, cast):
    ApiToken.issue(cast.viewer, "a")
    ApiToken.issue(cast.viewer, "b")
    cast.viewer.disable("test")
    db.session.commit()
    r = run(["users", "list"])
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["admin"][2:] == ["admin", "enabled", "0"]
    assert rows["viewer"][2:] == ["viewer", "disabled", "2"]


def test_users_disable_enable_and_delete_are_audited(run, cast):
    r = run(["users", "disable", "viewer"])
    assert r.returncode == 0 and r.stdout.strip() == "disabled viewer", r.stderr
    assert not _user_named("viewer").is_active
    assert run(["users", "disable", "viewer"]).stdout.strip() == "viewer was already disabled"
    r = run(["users", "enable", "viewer"])
    assert r.returncode == 0 and _user_named("viewer").is_active
    ApiToken.issue(_user_named("viewer"), "script")
    db.session.commit()
    r = run(["users", "delete", "viewer", "--yes"])
    assert r.returncode == 0, r.stderr
    assert _user_named("viewer") is None
    assert db.session.scalar(sa.select(sa.func.count(ApiToken.id))) == 0
    for action in ("user.disabled", "user.enabled", "user.deleted"):
        assert _audited(action) == [("cli", "viewer")], action


def test_users_delete_asks_first(run, cast):
    r = run(["users", "delete", "viewer"], stdin="n\n")
    assert r.returncode != 0
    assert _user_named("viewer") is not None


def test_the_cli_refuses_to_disable_delete_or_demote_the_last_admin(run, cast):
    for args in (["disable", "admin"], ["delete", "admin", "--yes"], ["set-role", "admin", "viewer"]):
        r = run(["users", *args])
        assert r.returncode == 1, args
        assert "it is the last enabled admin" in r.stderr, r.stderr
    u = _user_named("admin")
    assert u.is_active and u.role == "admin"
    assert run(["users", "disable", "nobody"]).stderr.strip() == "Error: no user 'nobody'"


def test_users_set_role_changes_the_role_and_audits_it(run, cast):
    r = run(["users", "set-role", "viewer", "admin"])
    assert r.returncode == 0, r.stderr
    assert _user_named("viewer").role == "admin"
    assert _audited("user.role_changed") == [("cli", "viewer")]


def test_cli_changes_reach_a_running_server_at_once(tmp_path, env, run, cast):
    """The server is one process, the CLI another: sessions and tokens die by the database alone.
    The password change is the console script as its own process."""
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
        # The rest through the same commands in this test process (which is not the server either).
        assert run(["users", "disable", "viewer"]).returncode == 0
        assert requests.get(base + "/api/hosts", headers=bearer, timeout=10).status_code == 401
        assert run(["users", "enable", "viewer"]).returncode == 0
        assert requests.get(base + "/api/hosts", headers=bearer, timeout=10).status_code == 200
        assert run(["users", "delete", "viewer", "--yes"]).returncode == 0
        r = requests.get(base + "/api/hosts", headers=bearer, timeout=10)
        assert r.status_code == 401, r.text
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_serve_refuses_to_start_with_a_bad_agent_certificate(tmp_path, pki):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    env = {
        "RM_INSTANCE_PATH": str(tmp_path / "inst"),
        "RM_SECRET_KEY": "k",
        "RM_HTTP_ADDR": "127.0.0.1:0",
        "RM_AGENT_ADDR": "127.0.0.1:0",
        "RM_AGENT_TLS_CERT": str(bad),
        "RM_AGENT_TLS_KEY": pki.server.key,
    }
    r = cli(["serve", "--ready-file", str(tmp_path / "ready")], env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"config error: RM_AGENT_TLS_CERT={str(bad)!r}: not a PEM certificate" in r.stderr
    assert not (tmp_path / "ready").exists()
