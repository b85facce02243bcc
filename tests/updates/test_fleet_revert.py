"""Fleet revert: the hosts a rollout updated go back to the version each ran before.

Scripted agents on real sockets, ticks driven by hand (as in test_fleet_rollout).
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from app.errors import Refusal
from app.extensions import db
from app.models import Alert, AuditEvent, FleetUpdate
from app.updates import fleet, releases, revert
from app.updates.strategy import Strategy
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.wait import wait_until
from tests.updates.test_fleet_rollout import (
    finish_update,
    fleet_actions,
    job_status,
    rollout,
    second_behind_host,
    statuses,
)

pytestmark = pytest.mark.timeout(30)


def drive():
    """Tick as the scheduler's fleet job does (a due revert first) until nothing more happens now."""
    db.session.rollback()
    while revert.start_due() or fleet.tick():
        pass


@pytest.fixture
def old_release(app, tmp_path):
    """The release the hosts ran before (kept by the server, as a real upgrade leaves it)."""
    path = tmp_path / "old.pyz"
    path.write_bytes(os.urandom(2048))
    key = releases.signing_key()
    signature = releases.sign_file(str(path), OLD_VERSION, "py3-any", key) if key else None
    return releases.register(str(path), OLD_VERSION, "py3-any", signature)


def two_updated_hosts(cast, agent_for, **start):
    """Roll app-1 and app-2 from OLD_VERSION to the server's version; return the rollout and agents."""
    h2, t2 = second_behind_host(cast)
    agents = [agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION), agent_for(h2, t2, OLD_VERSION)]
    fu = fleet.start("admin", **start)
    for agent in agents:
        drive()
        job = finish_update(agent)
        wait_until(lambda job=job: job_status(job) == "succeeded", what="updated")
    drive()
    return fu.id, agents


def revert_back(agents):
    """Play the agents through the revert: each takes a downgrade command and comes back at OLD_VERSION."""
    for agent in agents:
        drive()
        cmd = agent.expect("command.update")
        assert (cmd.data["version"], cmd.data["allow_downgrade"]) == (OLD_VERSION, True)
        agent.send("update.progress", job_id=cmd.data["job_id"], phase="restarting", bytes_done=1, bytes_total=1)
        agent.disconnect()
        agent.connect(version=OLD_VERSION, last_update={"job_id": cmd.data["job_id"], "outcome": "swapped"})
        wait_until(lambda j=cmd.data["job_id"]: job_status(j) == "succeeded", what="reverted")
    drive()


def test_a_finished_rollout_is_reverted_host_by_host_to_what_each_ran(cast, agent_for, old_release):
    fid, agents = two_updated_hosts(cast, agent_for)
    assert rollout(fid)["status"] == "succeeded"
    rv = revert.start(fid, "admin")
    r = rollout(rv.id)
    assert (r["kind"], r["parent_id"], r["status"], r["target_version"]) == ("revert", fid, "running", OLD_VERSION)
    assert [(h["name"], h["target_version"]) for h in r["hosts"]] == [("app-1", OLD_VERSION), ("app-2", OLD_VERSION)]
    revert_back(agents)
    r = rollout(rv.id)
    assert r["status"] == "succeeded" and statuses(rv.id) == ["succeeded", "succeeded"]
    assert [h["from_version"] for h in r["hosts"]] == [SERVER_VERSION, SERVER_VERSION]
    db.session.rollback()
    started = db.session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "fleet.update_started").order_by(AuditEvent.id)
    ).all()[-1]
    assert started.details["kind"] == "revert" and started.details["parent_id"] == fid
    assert started.details["versions"] == {"app-1": OLD_VERSION, "app-2": OLD_VERSION}
    assert fleet_actions()[-1] == "fleet.update_succeeded"
    with pytest.raises(Refusal) as e:  # a revert is not reverted: start an update instead
        revert.start(rv.id, "admin")
    assert e.value.code == "fleet_update_is_a_revert"


def test_a_revert_to_a_release_the_server_no_longer_has_is_refused_up_front(cast, agent_for, app):
    fid, agents = two_updated_hosts(cast, agent_for)
    with pytest.raises(Refusal) as e:
        revert.start(fid, "admin")
    assert (e.value.status, e.value.code) == (409, "revert_release_unavailable")
    assert f"no longer has the agent release {OLD_VERSION} (for app-1, app-2)" in e.value.message
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 1  # nothing was created
    assert all(a.inbox.empty() for a in agents)
    client = app.test_client()
    client.post("/login", data={"username": "admin", "password": "admin-pass-123"})
    r = client.post(f"/api/fleet-updates/{fid}/revert")
    assert r.status_code == 409 and r.json["error"]["code"] == "revert_release_unavailable"


def test_an_unsigned_release_is_refused_when_agents_pin_a_release_key(cast, agent_for, app, tmp_path):
    fid, _ = two_updated_hosts(cast, agent_for)
    path = tmp_path / "unsigned.pyz"
    path.write_bytes(os.urandom(2048))
    releases.register(str(path), OLD_VERSION)
    app.config["RELEASE_PUBLIC_KEY"] = "pinned-key"
    with pytest.raises(Refusal) as e:
        revert.start(fid, "admin")
    assert e.value.code == "revert_release_unavailable" and "is not signed" in e.value.message


def test_what_cannot_be_reverted_gets_a_typed_refusal(cast, agent_for, app, old_release):
    with pytest.raises(Refusal) as e:
        revert.start(999, "admin")
    assert (e.value.status, e.value.code) == (404, "fleet_update_not_found")
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    agent_for(h2, t2, OLD_VERSION)
    fu = fleet.start("admin")
    drive()
    with pytest.raises(Refusal) as e:  # still running
        revert.start(fu.id, "admin")
    assert e.value.code == "fleet_update_not_finished"
    a1.expect("command.update")
    fleet.cancel(fu.id, "admin")  # cancelled while app-1 updates: nothing updated yet
    with pytest.raises(Refusal) as e:
        revert.start(fu.id, "admin")
    assert e.value.code == "fleet_update_not_finished" and "still has hosts updating" in e.value.message
    client = app.test_client()
    client.post("/login", data={"username": "viewer", "password": "viewer-pass-123"})
    assert client.post(f"/api/fleet-updates/{fu.id}/revert").status_code == 403


def test_revert_on_halt_takes_the_updated_hosts_back_once_the_rollout_halts(cast, agent_for, old_release):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fid = fleet.start("admin", revert_on_halt=True).id
    assert rollout(fid)["revert_on_halt"] is True
    drive()
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="app-1 updated")
    drive()
    cmd = a2.expect("command.update")
    a2.send("update.result", job_id=cmd.data["job_id"], ok=False, error="disk full")
    wait_until(lambda: job_status(cmd.data["job_id"]) == "failed", what="app-2 failed")
    drive()
    assert rollout(fid)["status"] == "halted"
    db.session.rollback()
    rv = db.session.scalar(sa.select(FleetUpdate).where(FleetUpdate.parent_id == fid))
    assert rv is not None and rv.kind == "revert" and rv.created_by == "system"
    assert [h["name"] for h in rollout(rv.id)["hosts"]] == ["app-1"]  # only what the rollout updated
    assert rollout(fid)["revert_on_halt"] is False  # started once; a restart does not start another
    revert_back([a1])
    assert rollout(rv.id)["status"] == "succeeded"
    assert a2.inbox.empty()
    drive()
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id)).where(FleetUpdate.parent_id == fid)) == 1


def test_an_automatic_revert_that_cannot_start_says_so_once(cast, agent_for):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fid = fleet.start("admin", strategy=Strategy(), revert_on_halt=True).id
    drive()
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="app-1 updated")
    drive()
    cmd = a2.expect("command.update")
    a2.send("update.result", job_id=cmd.data["job_id"], ok=False, error="disk full")
    wait_until(lambda: job_status(cmd.data["job_id"]) == "failed", what="app-2 failed")
    drive()
    drive()
    assert rollout(fid)["status"] == "halted" and rollout(fid)["revert_on_halt"] is False
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 1
    refused = db.session.scalars(sa.select(AuditEvent).where(AuditEvent.action == "fleet.revert_refused")).all()
    assert len(refused) == 1 and OLD_VERSION in refused[0].details["reason"]
    alert = db.session.scalar(sa.select(Alert).where(Alert.dedup_key == f"fleet-revert:{fid}"))
    assert alert is not None and "could not be reverted" in alert.message
