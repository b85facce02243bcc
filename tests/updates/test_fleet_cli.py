"""``restic-manager fleet start --follow`` against a live server: the CLI process writes the rollout
to the database, the server's scheduler (its fleet tick) rolls it over the agents' sockets, and the
CLI follows it from the database to an exit code (0 succeeded, 1 halted)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from app.extensions import db
from app.opcli import follow_rollout
from app.runtime import runtime
from app.updates import fleet
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.live import ROOT, LiveServer, product_env
from tests.support.scripted import ScriptedAgent
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def live_with_scheduler(app, cast, release):
    app.config.update(FLEET_TICK_S=0.1, HEARTBEAT_S=5, HEARTBEAT_TIMEOUT=30, BUILD_AGENT_ON_START=False)
    with LiveServer(app, scheduler=True) as server:
        yield server


@pytest.fixture
def behind_agent(live_with_scheduler, app, cast):
    agent = ScriptedAgent(live_with_scheduler.agent_ws_url, cast.host_behind_token, OLD_VERSION)
    agent.connect()
    wait_until(lambda: runtime(app).connections.is_connected(cast.host_behind.id), what="agent registered")
    yield agent
    agent.disconnect()


def start_cli(tmp_path, database_url, *args):
    env = product_env(
        dict(
            RM_INSTANCE_PATH=str(tmp_path / "cli"),
            RM_DATABASE_URL=database_url,
            RM_VERSION=SERVER_VERSION,
            RM_SECRET_KEY="k",
        )
    )
    return subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_start_follow_exits_0_when_the_server_rolls_it_to_success(tmp_path, database_url, behind_agent):
    cli = start_cli(tmp_path, database_url, "fleet", "start", "--follow", "--interval", "0.05")
    cmd = behind_agent.expect("command.update", timeout=20)  # the server's tick dispatched the CLI's rollout
    job_id = cmd.data["job_id"]
    behind_agent.send("update.progress", job_id=job_id, phase="restarting", bytes_done=1, bytes_total=1)
    behind_agent.disconnect()
    behind_agent.connect(version=SERVER_VERSION, last_update={"job_id": job_id, "outcome": "swapped", "error": None})
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("fleet update ") and "started over 1 host(s)" in lines[0]
    assert "1. app-1: succeeded" in out
    assert "\x1b[" not in out  # not a terminal: plain lines
    assert lines[-1].startswith("fleet update ") and ": succeeded, 1/1 done" in lines[-1]


def test_start_follow_exits_1_when_the_rollout_halts(tmp_path, database_url, behind_agent):
    cli = start_cli(tmp_path, database_url, "fleet", "start", "--follow", "--interval", "0.05")
    cmd = behind_agent.expect("command.update", timeout=20)
    behind_agent.send("update.result", job_id=cmd.data["job_id"], ok=False, error="disk full")
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 1, (out, err)
    assert "app-1: failed: disk full" in out and "halted: host app-1" in out


def test_in_a_terminal_follow_draws_a_table_of_hosts_counts_and_elapsed_time(app, cast):
    fu = fleet.start("admin", host_ids=[cast.host_behind.id])
    fleet.cancel(fu.id, "admin")
    db.session.commit()
    out = io.StringIO()
    assert follow_rollout(fu.id, interval=0.05, out=out, tty=True) == 1  # cancelled: not a success
    text = out.getvalue()
    assert "app-1" in text and "cancelled" in text and "0/1 done" in text
    assert "host" in text and "status" in text and "phase" in text  # the table's header
    assert re.search(r"fleet update \d+ to 2\.0\.0: cancelled, 0/1 done \(1 cancelled\), \d+ s", text)
