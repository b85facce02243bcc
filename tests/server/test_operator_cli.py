"""The operator's command line: version, help, first steps, hosts list, jobs show, fleet commands.

Each command runs as a real process with an RM_* environment, as an operator runs it. Exit codes:
0 succeeded, 1 failed/halted/refused, 2 usage error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.version import get_version
from app.extensions import db
from app.models import Job
from app.timeutil import utcnow
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.live import ROOT, product_env, release_key

# A hang guard, not a speed check: a test here starts up to eight processes, each paying the
# product's imports, and on a loaded machine that alone can take a minute.
pytestmark = pytest.mark.timeout(180)


#: The console script, as an operator runs it (the test environment has the project installed).
RESTIC_MANAGER = os.path.join(os.path.dirname(sys.executable), "restic-manager")


def run(args, env, cwd=ROOT):
    return subprocess.run(
        [RESTIC_MANAGER, *args], cwd=cwd, env=product_env(env), capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def env(tmp_path, database_url, cast):
    """The cast's database, as every command of an operator's shell sees it."""
    instance = str(tmp_path / "cli-instance")
    return dict(RM_INSTANCE_PATH=instance, RM_DATABASE_URL=database_url, RM_SECRET_KEY="k", RM_VERSION=SERVER_VERSION)


def test_version_is_the_products_and_help_offers_no_flask_options(tmp_path):
    r = run(["--version"], {}, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"restic-manager {get_version()}"
    assert "Flask" not in r.stdout and "Werkzeug" not in r.stdout
    r = run(["--help"], {"RM_INSTANCE_PATH": str(tmp_path / "i")}, cwd=tmp_path)
    assert r.returncode == 0
    for flask_only in ("--env-file", "--app", "--debug", "python-dotenv"):
        assert flask_only not in r.stdout
    for command in ("fleet", "hosts", "jobs", "serve", "db"):
        assert f"  {command} " in r.stdout


#: What a run that opens no database must not import: it would cost the operator ~1 s every time.
HEAVY_MODULES = ("flask", "sqlalchemy", "flask_sqlalchemy", "flask_migrate", "alembic", "werkzeug", "app.models")

#: Answering these needs no app: help, the version, and usage errors that click finds itself.
APPLESS_RUNS = (
    ["--help"],
    ["--version"],
    ["fleet", "--help"],
    ["fleet", "start", "--help"],
    ["users", "create", "--help"],
    ["fleet", "start", "--bogus"],
    ["fleet", "start", "--interval", "0"],
    ["hosts", "list", "--json", "extra"],
    ["users", "set-role", "bob", "nobody"],
    ["no-such-command"],
)


def test_help_version_and_usage_errors_import_no_flask_sqlalchemy_or_models(tmp_path):
    """The console script's own entry point, run in one fresh process for every case above."""
    script = f"""
import contextlib, io, json, sys
from app.cli import main
codes = []
for args in {APPLESS_RUNS!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            codes.append(e.code)
print(json.dumps({{"codes": codes, "heavy": sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RM_")} | {"RM_INSTANCE_PATH": str(tmp_path / "i")}
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["codes"] == [0, 0, 0, 0, 0, 2, 2, 2, 2, 2]
    assert result["heavy"] == []
    assert not (tmp_path / "i").exists()  # no app was created


def test_the_help_shows_flask_migrates_own_line_for_db():
    """``--help`` lists ``db`` without importing Flask-Migrate; its line must still be Flask-Migrate's."""
    from flask_migrate.cli import db as db_group

    from app.cli import DB_SHORT_HELP

    assert db_group.get_short_help_str() == DB_SHORT_HELP


def test_a_command_before_db_upgrade_says_to_run_it(tmp_path):
    env = {"RM_INSTANCE_PATH": str(tmp_path), "RM_DATABASE_URL": f"sqlite:///{tmp_path}/empty.sqlite3"}
    for args in (["hosts", "list"], ["hosts", "add", "web-1"], ["fleet", "status"]):
        r = run(args, env)
        assert r.returncode == 1, r
        assert "Run `restic-manager db upgrade` first" in r.stderr and "Traceback" not in r.stderr


def test_the_instance_folder_defaults_to_instance_in_the_working_directory(tmp_path):
    r = run(["db", "upgrade"], {}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "instance" / "restic-manager.sqlite3").is_file()
    assert (tmp_path / "instance" / "secret_key").is_file()
    r = run(["hosts", "list", "--json"], {}, cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["hosts"] == []


def test_hosts_list_as_a_table_and_as_json(env):
    r = run(["hosts", "list"], env)
    assert r.returncode == 0, r.stderr
    assert "3 host(s); server version 2.0.0" in r.stdout
    rows = [line.replace("│", " ").split() for line in r.stdout.splitlines() if "│" in line and line[:1].isdigit()]
    lines = {row[1]: " ".join(row) for row in rows}
    assert set(lines) == {"web-1", "db-1", "app-1"}
    assert "behind" in lines["app-1"] and "current" in lines["web-1"]
    r = run(["hosts", "list", "--json"], env)
    hosts = json.loads(r.stdout)["hosts"]
    assert [(h["name"], h["version_state"]) for h in hosts] == [
        ("app-1", "behind"),
        ("db-1", "current"),
        ("web-1", "current"),
    ]
    r = run(["hosts", "list", "--behind", "--json"], env)
    assert [h["name"] for h in json.loads(r.stdout)["hosts"]] == ["app-1"]


def test_hosts_add_warns_loudly_without_a_release_key_and_pins_the_key_with_one(env):
    r = run(["hosts", "add", "new-1"], env)
    assert r.returncode == 0
    assert "--release-key" not in r.stdout
    assert "WARNING" in r.stderr and "never be able to update itself" in r.stderr
    _, public = release_key()
    r = run(["hosts", "add", "new-2"], {**env, "RM_RELEASE_PUBLIC_KEY": public})
    assert r.returncode == 0 and "WARNING" not in r.stderr
    assert f"--release-key {public}" in r.stdout


def _job(cast, status):
    now = utcnow()
    job = Job(
        host_id=cast.host_behind.id,
        kind="update",
        status=status,
        phase="done" if status == "succeeded" else "downloading",
        actor="admin",
        created_at=now,
        updated_at=now,
        finished_at=now,
        params={"version": SERVER_VERSION, "from_version": OLD_VERSION},
        error="disk full" if status == "failed" else None,
    )
    db.session.add(job)
    db.session.commit()
    return job.id


def test_jobs_show_exits_by_the_jobs_outcome(env, cast):
    ok, failed = _job(cast, "succeeded"), _job(cast, "failed")
    r = run(["jobs", "show", ok], env)
    assert r.returncode == 0 and "status:         succeeded" in r.stdout and "host:           app-1" in r.stdout
    r = run(["jobs", "show", failed], env)
    assert r.returncode == 1 and "error:          disk full" in r.stdout
    r = run(["jobs", "show", failed, "--json"], env)
    assert json.loads(r.stdout)["job"]["id"] == failed
    r = run(["jobs", "show", "no-such-job"], env)
    assert r.returncode == 2 and "no job with id no-such-job" in r.stderr


def test_fleet_plan_start_status_cancel_and_their_exit_codes(env, cast):
    r = run(["fleet", "plan", "--json"], env)
    assert r.returncode == 0
    plan = json.loads(r.stdout)["plan"]
    assert [h["name"] for h in plan["hosts"]] == ["app-1"]
    assert {lo["name"]: lo["reason"] for lo in plan["left_out"]} == {
        "db-1": "already_at_target",
        "web-1": "already_at_target",
    }
    r = run(["fleet", "plan"], env)
    assert r.returncode == 0 and "app-1" in r.stdout and "Left out: 2 host(s)" in r.stdout

    r = run(["fleet", "start"], env)
    assert r.returncode == 0 and "started over 1 host(s)" in r.stdout, r.stderr
    fleet_id = r.stdout.split()[2]
    r = run(["fleet", "start"], env)
    assert r.returncode == 1 and "fleet_update_running" in r.stderr
    r = run(["fleet", "status"], env)
    assert r.returncode == 0 and f"fleet update {fleet_id} to 2.0.0: running, 0/1 done" in r.stdout
    assert "1. app-1: pending" in r.stdout
    r = run(["fleet", "status", fleet_id, "--json"], env)
    assert json.loads(r.stdout)["fleet_update"]["status"] == "running"

    r = run(["fleet", "cancel"], env)
    assert r.returncode == 0 and f"fleet update {fleet_id} cancelled" in r.stdout
    r = run(["fleet", "status", fleet_id], env)
    assert r.returncode == 1 and "cancelled" in r.stdout
    r = run(["fleet", "cancel", fleet_id], env)
    assert r.returncode == 1 and "fleet_update_not_running" in r.stderr


def test_usage_errors_exit_2(env, cast):
    for args, message in (
        (["fleet", "plan", "--host", "no-such-host"], "no host named 'no-such-host'"),
        (["fleet", "start", "--host", "no-such-host"], "no host named 'no-such-host'"),
        (["fleet", "status", "999"], "no fleet update with id 999"),
        (["fleet", "cancel", "999"], "no fleet update with id 999"),
        (["fleet", "cancel"], "no fleet update is running"),
        (["fleet", "start", "--bogus"], "No such option"),
        (["fleet", "pause", "999"], "no fleet update with id 999"),
        (["fleet", "skip", "no-such-host"], "no host named 'no-such-host'"),
        (["hosts", "list", "--json", "extra"], "unexpected extra argument"),
    ):
        r = run(args, env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    r = run(["fleet", "start", "--host", "web-1"], env)  # named, but already current: nothing to do
    assert r.returncode == 1 and "no_hosts_to_update" in r.stderr


@pytest.mark.timeout(120)
def test_fleet_plan_and_start_take_the_strategy_options(env, cast):
    r = run(["fleet", "plan", "--json", "--canary", "1", "--max-in-flight", "50%", "--offline", "wait"], env)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["strategy"]["max_in_flight"] == "50%" and plan["waves"][0]["canary"] is True
    r = run(["fleet", "plan", "--max-failures", "5"], env)
    assert r.returncode == 0 and "tolerate 5 failure(s)" in r.stdout and "wave" in r.stdout
    r = run(["fleet", "start", "--max-in-flight", "ten"], env)
    assert r.returncode == 2 and "invalid_strategy" in r.stderr and "max_in_flight" in r.stderr  # a usage error
    r = run(["fleet", "start", "--max-in-flight", "2", "--max-failures", "1"], env)
    assert r.returncode == 0, r.stderr
    r = run(["fleet", "status", r.stdout.split()[2], "--json"], env)
    fu = json.loads(r.stdout)["fleet_update"]
    assert (fu["max_in_flight"], fu["max_failures"]) == ("2", "1")


@pytest.mark.timeout(120)
def test_fleet_pause_resume_skip_and_retry(env, cast):
    from app.updates import fleet

    fleet_id = str(fleet.start("admin").id)
    r = run(["fleet", "pause"], env)
    assert r.returncode == 0 and f"fleet update {fleet_id} paused" in r.stdout
    r = run(["fleet", "pause"], env)
    assert r.returncode == 1 and "fleet_update_paused" in r.stderr
    r = run(["fleet", "resume", fleet_id], env)
    assert r.returncode == 0 and "resumed" in r.stdout
    r = run(["fleet", "skip", "app-1"], env)
    assert r.returncode == 0 and "app-1 skipped" in r.stdout
    fleet.cancel(int(fleet_id), "admin")
    r = run(["fleet", "retry", fleet_id], env)
    assert r.returncode == 0 and f"retries 1 host(s) of fleet update {fleet_id}" in r.stdout, r.stderr
    r = run(["fleet", "retry", fleet_id], env)
    assert r.returncode == 1 and "fleet_update_running" in r.stderr  # the retry runs now
