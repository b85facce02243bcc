"""What the server believes about an update, against agents that replay, lie or vanish (issue 9).

Scripted agents on real sockets to the live server: each test chooses exactly what an agent
reports. The real-agent versions of these cases are in ``tests/e2e/test_update_trust.py``.
"""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa

from app.extensions import db
from app.models import Alert, ApiToken, AuditEvent, Job
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def api(live, cast):
    _, token = ApiToken.issue(cast.admin, "tests")
    db.session.commit()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    s.base = live.admin_url
    return s


def post(api, path, body=None):
    return api.post(api.base + path, json=body or {}, timeout=10)


def job_row(job_id):
    db.session.rollback()
    return db.session.get(Job, job_id)


def open_alerts():
    db.session.rollback()
    return db.session.scalars(sa.select(Alert).where(Alert.resolved_at.is_(None))).all()


def job_actions(job_id):
    db.session.rollback()
    events = db.session.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
    return [e.action for e in events if e.details.get("job_id") == job_id]


def start_update(api, host):
    r = post(api, f"/api/hosts/{host.id}/update")
    assert r.status_code == 202, r.text
    return r.json()["job"]["id"]


def succeed(agent, job_id):
    """Play the agent through a good update: it comes back at the target and the job succeeds."""
    agent.send("update.progress", job_id=job_id, phase="restarting", bytes_done=1, bytes_total=1)
    wait_until(lambda: job_row(job_id).phase == "restarting", what="restarting")
    agent.disconnect()
    agent.connect(version=SERVER_VERSION, last_update={"job_id": job_id, "outcome": "swapped", "error": None})
    wait_until(lambda: job_row(job_id).status == "succeeded", what="succeeded")


def test_the_welcome_and_the_command_name_the_host(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    agent.disconnect()
    welcome = agent.connect()
    assert welcome.data["host_id"] == cast.host_behind.id
    job_id = start_update(api, cast.host_behind)
    cmd = agent.expect("command.update")
    assert (cmd.data["job_id"], cmd.data["host_id"]) == (job_id, cast.host_behind.id)
    assert job_row(job_id).host_name == cast.host_behind.name


def test_a_replayed_failure_after_success_does_not_touch_the_job(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    agent.expect("command.update")
    succeed(agent, job_id)

    # A replayed command whose download was cut: a failure report, then a hello still at the target.
    agent.send("update.result", job_id=job_id, ok=False, error="download truncated: got 4096 of 9000 bytes")
    agent.disconnect()
    agent.connect(
        version=SERVER_VERSION,
        last_update={"job_id": job_id, "outcome": "failed", "error": "download truncated: got 4096 of 9000 bytes"},
    )
    r = post(api, f"/api/hosts/{cast.host_behind.id}/ping")  # the hello has been handled before this answers
    assert r.status_code == 200
    row = job_row(job_id)
    assert (row.status, row.error) == ("succeeded", None)
    assert open_alerts() == []
    assert job_actions(job_id)[-1] == "host.update_succeeded"


def test_a_last_update_failure_naming_a_running_job_of_another_host_is_ignored(cast, agent_for, api):
    victim = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    victim.expect("command.update")
    other = agent_for(cast.host_online, cast.host_online_token, SERVER_VERSION)
    other.send("update.result", job_id=job_id, ok=False, error="forged")
    other.disconnect()
    other.connect(last_update={"job_id": job_id, "outcome": "failed", "error": "forged"})
    assert post(api, f"/api/hosts/{cast.host_online.id}/ping").status_code == 200
    assert job_row(job_id).status == "running"


def test_revoking_a_host_fails_its_running_job_at_once_naming_the_revocation(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    agent.expect("command.update")
    assert post(api, f"/api/hosts/{cast.host_behind.id}/revoke").status_code == 200
    row = job_row(job_id)  # at once: in the revoke's own request, not by a later sweep
    assert row.status == "failed" and row.error == "host token revoked", row.error
    assert job_actions(job_id)[-1] == "host.update_failed"


def test_reissuing_a_hosts_token_fails_its_running_job_at_once(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    agent.expect("command.update")
    assert post(api, f"/api/hosts/{cast.host_behind.id}/token").status_code == 200
    row = job_row(job_id)
    assert row.status == "failed" and row.error == "host token replaced", row.error


def test_deleting_a_host_cancels_its_running_job_and_keeps_the_history(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    agent.expect("command.update")
    host_id, name = cast.host_behind.id, cast.host_behind.name
    r = api.delete(f"{api.base}/api/hosts/{host_id}", timeout=10)
    assert r.status_code == 204
    job = api.get(f"{api.base}/api/jobs/{job_id}", timeout=10).json()["job"]
    assert (job["status"], job["error"], job["host_id"], job["host_name"]) == ("cancelled", "host deleted", None, name)
    assert job["finished_at"] is not None
    assert job_actions(job_id) == ["host.update_dispatched", "host.update_cancelled"]
    assert post(api, "/api/fleet/update", {"host_ids": [host_id]}).status_code == 422


def test_a_finished_job_of_a_deleted_host_keeps_its_outcome(cast, agent_for, api):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job_id = start_update(api, cast.host_behind)
    agent.expect("command.update")
    succeed(agent, job_id)
    assert api.delete(f"{api.base}/api/hosts/{cast.host_behind.id}", timeout=10).status_code == 204
    job = api.get(f"{api.base}/api/jobs/{job_id}", timeout=10).json()["job"]
    assert (job["status"], job["host_name"]) == ("succeeded", cast.host_behind.name)
    assert "host.update_cancelled" not in job_actions(job_id)
