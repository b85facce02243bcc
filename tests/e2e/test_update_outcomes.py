"""The update smoke test's outcomes on one shared server: a real ``restic-manager serve`` process
started once for the module, one host and one real agent (version A, under a supervisor) per test.

An admin presses "Update agent" (the HTMX form post) and the agent swaps to B, or refuses a corrupt
artifact, or comes back at the old version, or rolls back a program that crash-loops. The tests
are independent: each has a host of its own, reads only that host's jobs, alerts and audit events,
and starts from the genuine release B (put back before each test; some of them replace it).
Starting a server per test cost more than the tests themselves (see test_update_smoke.py for the
cases that need a server of their own).
"""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy as sa

from app import create_app
from app.extensions import db
from app.models import Host
from app.updates import releases
from tests.conftest import SERVER_VERSION, TEST_PASSWORD_HASH_METHOD
from tests.e2e.test_update_smoke import (
    A,
    B,
    _serve_signed_artifact,
    admin_when_online,
    corrupt,
    online_at,
    press_update,
    release_path,
    terminal_job,
)
from tests.support import dbsetup
from tests.support.live import LiveFleet, release_key
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: One host per test, so no test sees another's job, alert or agent.
HOSTS = ("swap", "corrupt", "old-version", "crash-loop")


@pytest.fixture(scope="module")
def shared(db_template, tmp_path_factory):
    """A server process on a database of the module's own, the hosts enrolled, and the genuine
    release B's bytes and signature (as the server built them at start)."""
    tmp = tmp_path_factory.mktemp("outcomes")
    url = dbsetup.fresh_database(db_template, str(tmp))
    config = {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp / "instance"),
        "SQLALCHEMY_DATABASE_URI": url,
        "SECRET_KEY": "test-secret",
        "VERSION": SERVER_VERSION,
        "PASSWORD_HASH_METHOD": TEST_PASSWORD_HASH_METHOD,
    }
    app = create_app(config, environ={})
    with app.app_context():
        fleet = LiveFleet(str(tmp), url, str(tmp_path_factory.getbasetemp() / "agent-builds"))
        try:
            fleet.seed([f"smoke-{name}" for name in HOSTS])
            srv = fleet.start_server()
            with open(release_path(srv), "rb") as f, open(release_path(srv) + ".sig") as g:
                genuine = (f.read(), g.read())
            yield fleet, genuine
        finally:
            fleet.stop()
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def fleet(shared):
    """The shared fleet with release B as the server built it; the test's agents stop after it."""
    fleet, (program, signature) = shared
    path = release_path(fleet.server)
    with open(path, "wb") as f:
        f.write(program)
    with open(path + ".sig", "w") as f:
        f.write(signature)
    db.session.rollback()
    releases.register(path, B)
    started = len(fleet.agents)
    yield fleet
    for agent in fleet.agents[started:]:
        agent.stop()


def host(fleet, name: str) -> tuple[int, str]:
    """(host id, agent token) of this test's host."""
    i = HOSTS.index(name)
    return fleet.host_ids[i], fleet.tokens[i]


def alerts_of(admin, host_id) -> list[dict]:
    return [a for a in admin.open_alerts() if a["host_id"] == host_id]


def audit_of(admin, host_id) -> list[str]:
    name = admin.host(host_id)["name"]
    return [e["action"] for e in admin.get_json("/api/audit?limit=500")["events"] if e["target"] == name]


def test_pressing_update_swaps_the_agent_and_it_comes_back_at_the_servers_version(fleet):
    host_id, token = host(fleet, "swap")
    srv = fleet.server
    ag = fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    old_bytes = ag.program_bytes()
    pid = ag.supervisor.pid

    press_update(admin, host_id)
    job = terminal_job(admin, host_id)
    assert job["status"] == "succeeded", job
    assert online_at(admin, host_id, B)

    with open(release_path(srv), "rb") as f:
        assert ag.program_bytes() == f.read()  # the file was swapped for the release
    with open(ag.program + ".old", "rb") as f:
        assert f.read() == old_bytes  # the previous program is kept
    assert not os.path.exists(ag.program + ".new")
    # the shipped restart: the agent re-executed the new file in place (same process, no supervisor
    # restart, so no RestartSec); the supervisor would only step in had the exec failed
    assert ag.supervisor.restarts == 0 and ag.supervisor.pid == pid, ag.log()
    assert "agent.reexec: restarting in place" in ag.log()
    log = srv.log()
    for phase in ("downloading", "verifying", "staging", "restarting"):
        assert re.search(rf"job {job['id']}: phase {phase}\b", log), f"phase {phase} not reported"
    actions = audit_of(admin, host_id)
    assert "host.update_dispatched" in actions and "host.update_succeeded" in actions
    assert alerts_of(admin, host_id) == []


def test_a_corrupt_artifact_fails_the_job_and_the_agent_keeps_its_program(fleet):
    host_id, token = host(fleet, "corrupt")
    srv = fleet.server
    ag = fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    old_bytes = ag.program_bytes()
    corrupt(release_path(srv))

    press_update(admin, host_id)
    job = terminal_job(admin, host_id)
    assert job["status"] == "failed"
    assert "sha256" in job["error"]
    assert ag.program_bytes() == old_bytes
    assert not os.path.exists(ag.program + ".new")
    assert ag.supervisor.restarts == 0
    assert online_at(admin, host_id, A)
    alerts = alerts_of(admin, host_id)
    assert len(alerts) == 1 and alerts[0]["kind"] == "update_failed" and "sha256" in alerts[0]["message"]
    assert "host.update_failed" in audit_of(admin, host_id)


def test_an_agent_that_comes_back_at_the_old_version_fails_the_job_at_once(fleet):
    host_id, token = host(fleet, "old-version")
    srv = fleet.server
    fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    # The server offers B, but the artifact it serves is really an A build (sha256 consistent).
    a_build = fleet.program(A)
    with open(a_build, "rb") as src, open(release_path(srv), "wb") as dst:
        dst.write(src.read())
    db.session.rollback()

    with open(release_key()[0], "rb") as f:
        releases.sign_file(release_path(srv), B, "py3-any", f.read())  # a correctly signed, wrong program
    releases.register(release_path(srv), B)

    press_update(admin, host_id)
    job = terminal_job(admin, host_id)
    assert job["status"] == "failed"
    # The agent itself notices (its hello's last_update) before the watcher's own check would.
    assert f"at version {A}" in job["error"] and B in job["error"], job["error"]
    wait_until(lambda: online_at(admin, host_id, A), 20, what="agent online at A")
    db.session.rollback()
    assert db.session.scalar(sa.select(Host.agent_version).where(Host.id == host_id)) == A


def test_a_new_program_that_crash_loops_is_rolled_back_and_the_job_fails_with_the_reason(fleet):
    host_id, token = host(fleet, "crash-loop")
    srv = fleet.server
    ag = fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    old_bytes = ag.program_bytes()
    _serve_signed_artifact(srv, b"#!/usr/bin/env python3\nimport sys\nsys.exit(3)\n")

    press_update(admin, host_id)
    job = terminal_job(admin, host_id, timeout=60)
    assert job["status"] == "failed"
    assert "crash-looped" in job["error"], job["error"]
    wait_until(lambda: online_at(admin, host_id, A), 20, what="the restored program online at A")
    assert ag.program_bytes() == old_bytes
    assert [a["kind"] for a in alerts_of(admin, host_id)] == ["update_failed"]
