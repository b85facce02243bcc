"""The product's smoke test, automated: a real server process, a real agent under a supervisor.

The agent is built from this tree as version A (1.0.0); the server claims and ships B (2.0.0).
An admin logs in over HTTP and presses "Update agent" (the HTMX form post); the agent downloads,
verifies, swaps, re-executes the new file in place (as on a real host: the supervisor only
restarts what exits), and says hello at B.

The cases that need a server of their own (a throttled download, a short update timeout, a proxy
in front of the agent plane) are here; the ones a default server can run side by side, each with
its own host and agent, share one server in ``test_update_outcomes.py``.
"""

from __future__ import annotations

import os
import signal

import pytest

from app.extensions import db
from tests.support.live import LiveClient
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

A, B = "1.0.0", "2.0.0"


@pytest.fixture
def fleet(live_fleet):
    """An admin and one enrolled host, ``smoke-1``, in the test database (no processes yet)."""
    return live_fleet.seed(["smoke-1"])


def latest_job(session, host_id):
    jobs = session.jobs(host_id)
    return jobs[0] if jobs else None


def press_update(session, host_id):
    token = session.csrf_token(f"/hosts/{host_id}")
    r = session.http.post(
        f"{session.base}/hosts/{host_id}/update",
        headers={"HX-Request": "true", "X-CSRFToken": token or ""},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code == 200, r.text[:500]
    assert 'id="update-status"' in r.text and "<html" not in r.text  # the panel, polling
    return r


def terminal_job(session, host_id, timeout=30):
    def done():
        job = latest_job(session, host_id)
        return job if job and job["status"] != "running" else None

    return wait_until(done, timeout, 0.05, "the update job to end")


def online_at(session, host_id, version):
    h = session.host(host_id)
    return h["online"] and h["agent_version"] == version


def admin_when_online(srv, host_id, version=A):
    """Log in as the admin and wait until the host's agent is online at ``version``."""
    admin = LiveClient(srv.admin_url).login()
    wait_until(lambda: online_at(admin, host_id, version), 20, what=f"agent online at {version}")
    return admin


def release_path(server_proc):
    return os.path.join(server_proc.instance_dir, "releases", f"restic-manager-agent-{B}.pyz")


def corrupt(path: str) -> None:
    """Flip one byte of the artifact: same size, wrong sha256."""
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_download_that_breaks_off_half_way_leaves_the_old_program(fleet):
    host_id, token = fleet.host_ids[0], fleet.tokens[0]
    srv = fleet.start_server(RM_DOWNLOAD_RATE_KIB="64", RM_UPDATE_TIMEOUT="6")
    ag = fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    old_bytes = ag.program_bytes()

    press_update(admin, host_id)
    wait_until(lambda: (latest_job(admin, host_id) or {}).get("phase") == "downloading", 10, what="downloading")
    srv.stop(signal.SIGKILL)  # the connection breaks off mid-body
    srv.start()
    admin = LiveClient(srv.admin_url).login()
    job = terminal_job(admin, host_id, timeout=30)
    assert job["status"] == "failed"
    assert job["error"]
    assert ag.program_bytes() == old_bytes
    assert not os.path.exists(ag.program + ".new")
    wait_until(lambda: online_at(admin, host_id, A), 20, what="agent back online at A")


def test_an_agent_that_never_comes_back_times_out_with_a_clear_message(fleet):
    host_id, token = fleet.host_ids[0], fleet.tokens[0]
    srv = fleet.start_server(RM_UPDATE_TIMEOUT="3")
    ag = fleet.start_agent(token)
    admin = admin_when_online(srv, host_id)
    # a signed new program that starts (the old agent re-executes it) but never says hello
    _serve_signed_artifact(srv, b"#!/usr/bin/env python3\nimport time\ntime.sleep(3600)\n")
    ag.supervisor.restart_sec = 3600  # and, should it exit, the service manager gives up on it
    press_update(admin, host_id)
    job = terminal_job(admin, host_id, timeout=20)
    assert job["status"] == "failed"
    assert job["error"] == f"timed out after 3 s waiting for version {B}"
    assert [a["kind"] for a in admin.open_alerts()] == ["update_failed"]


def _serve_signed_artifact(srv, body: bytes) -> None:
    """Make the server offer ``body`` as release B, correctly signed: it verifies, then misbehaves."""
    from app.updates import releases
    from tests.support.live import release_key

    with open(release_path(srv), "wb") as f:
        f.write(body)
    with open(release_key()[0], "rb") as f:
        releases.sign_file(release_path(srv), B, "py3-any", f.read())
    db.session.rollback()
    releases.register(release_path(srv), B)


def test_a_new_program_that_never_reaches_the_server_is_rolled_back(fleet):
    from tests.support.faultproxy import FaultProxy

    host_id, token = fleet.host_ids[0], fleet.tokens[0]
    srv = fleet.start_server()
    proxy = fleet.add(FaultProxy(srv.agent_port).start())
    ag = fleet.start_agent(token, url=proxy.ws_url, extra_config="probation_s = 2\n")
    admin = admin_when_online(srv, host_id)
    old_bytes = ag.program_bytes()
    # The proxy refuses every new connection from the moment the old program's download passes:
    # the old program finishes over the connections it has (link and download), the new one
    # cannot reach the server. (Polling for the "restarting" phase, or for the download, and then
    # switching raced the new program's first connect on a loaded machine.)
    proxy.refuse_after_download = True
    press_update(admin, host_id)
    wait_until(lambda: "never reached the server" in ag.log(), 20, 0.1, "the probation rollback")
    proxy.set_mode("pass")
    job = terminal_job(admin, host_id, timeout=30)
    assert job["status"] == "failed"
    assert "never reached the server within 2 s" in job["error"], job["error"]
    wait_until(lambda: online_at(admin, host_id, A), 20, what="the restored program online at A")
    assert ag.program_bytes() == old_bytes
