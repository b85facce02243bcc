"""The fleet rollout state machine, driven tick by tick against scripted agents on real sockets."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from app.errors import Refusal
from app.extensions import db
from app.models import Alert, AuditEvent, FleetUpdate, Host, Job
from app.runtime import runtime
from app.updates import fleet, watcher
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


def drive():
    """Tick until the state machine has nothing more to do right now."""
    db.session.rollback()
    while fleet.tick():
        pass


def rollout(fid):
    db.session.rollback()
    return db.session.get(FleetUpdate, fid).to_dict()


def statuses(fid):
    return [h["status"] for h in rollout(fid)["hosts"]]


def fleet_actions():
    db.session.rollback()
    return db.session.scalars(
        sa.select(AuditEvent.action).where(AuditEvent.action.like("fleet.%")).order_by(AuditEvent.id)
    ).all()


def open_halt_alerts():
    db.session.rollback()
    return db.session.scalars(
        sa.select(Alert).where(Alert.kind == "fleet_update_halted", Alert.resolved_at.is_(None))
    ).all()


def second_behind_host(cast):
    host, token = Host.enrol("app-2")
    host.agent_version, host.capabilities = OLD_VERSION, ["update"]
    db.session.commit()
    return host, token


def finish_update(agent, version=SERVER_VERSION):
    """Play a well-behaved agent: take the command, report restarting, come back at ``version``."""
    cmd = agent.expect("command.update")
    agent.send("update.progress", job_id=cmd.data["job_id"], phase="restarting", bytes_done=1, bytes_total=1)
    agent.disconnect()
    agent.connect(version=version, last_update={"job_id": cmd.data["job_id"], "outcome": "swapped", "error": None})
    return cmd.data["job_id"]


def job_status(job_id):
    db.session.rollback()
    return db.session.get(Job, job_id).status


def test_two_hosts_roll_one_after_the_other_and_succeed(cast, agent_for):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fu = fleet.start("admin")
    assert [h["name"] for h in rollout(fu.id)["hosts"]] == ["app-1", "app-2"]  # by name
    drive()
    assert statuses(fu.id) == ["running", "pending"]
    assert a2.inbox.empty()  # one host at a time
    job1 = finish_update(a1)
    wait_until(lambda: job_status(job1) == "succeeded", what="host 1 done")
    drive()
    assert statuses(fu.id) == ["succeeded", "running"]
    job2 = finish_update(a2)
    wait_until(lambda: job_status(job2) == "succeeded", what="host 2 done")
    drive()
    r = rollout(fu.id)
    assert r["status"] == "succeeded" and r["done"] == r["total"] == 2
    assert all(h["duration_s"] is not None for h in r["hosts"])
    assert fleet_actions() == ["fleet.update_started", "fleet.update_succeeded"]


def test_a_timed_out_host_halts_the_rollout_with_an_alert(cast, agent_for, clock):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fu = fleet.start("admin")
    drive()
    a1.expect("command.update")
    clock.advance(91)
    assert watcher.sweep_timeouts() == 1
    drive()
    r = rollout(fu.id)
    assert r["status"] == "halted"
    assert statuses(fu.id) == ["failed", "pending"]
    assert "app-1" in r["halt_reason"] and "timed out" in r["halt_reason"]
    assert a2.inbox.empty()
    alerts = open_halt_alerts()
    assert len(alerts) == 1 and alerts[0].host_id is None and "app-1" in alerts[0].message
    assert fleet_actions()[-1] == "fleet.update_halted"


def test_an_offline_host_halts_the_rollout_once_its_grace_to_reconnect_is_over(cast, agent_for, clock):
    fid = fleet.start("admin", host_ids=[cast.host_behind.id]).id  # app-1 has no agent connected
    drive()
    assert rollout(fid)["status"] == "running"  # it may just be reconnecting after a restart
    clock.advance(31)
    drive()
    r = rollout(fid)
    assert r["status"] == "halted" and "offline" in r["halt_reason"]
    assert r["halt_reason"] == "host app-1: stayed offline past the 30 s grace to reconnect"
    assert statuses(fid) == ["failed"]


@pytest.mark.parametrize(
    "error,reason",
    [
        ("host web-3 is offline", "host web-3 is offline"),
        ("the agent on web-3 (1.0) does not announce the 'update' capability", None),
        ("timed out after 90 s", "host web-3: timed out after 90 s"),
        ("host web-30 is offline", "host web-3: host web-30 is offline"),  # another host's name is not ours
        (None, "host web-3: update failed"),
    ],
)
def test_a_halt_reason_names_the_host_once(error, reason):
    assert fleet.halt_reason("web-3", error) == (reason or error)


def test_a_rollout_of_hosts_already_current_is_refused_like_an_empty_one(cast):
    with pytest.raises(Refusal) as e:
        fleet.start("admin", host_ids=[cast.host_online.id, cast.host_offline.id])  # both run 2.0.0
    assert (e.value.status, e.value.code) == (422, "no_hosts_to_update")
    assert "web-1" in e.value.message and "db-1" in e.value.message
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 0
    # One behind host among current ones is enough: the current ones are skipped as before.
    fu = fleet.start("admin", host_ids=[cast.host_online.id, cast.host_behind.id])
    assert [h["name"] for h in rollout(fu.id)["hosts"]] == ["web-1", "app-1"]


def test_a_host_that_reconnects_within_the_grace_is_updated(cast, agent_for, clock):
    fid = fleet.start("admin", host_ids=[cast.host_behind.id]).id
    drive()
    clock.advance(10)
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    drive()
    assert statuses(fid) == ["running"]
    job = finish_update(agent)
    wait_until(lambda: job_status(job) == "succeeded", what="done")
    drive()
    assert rollout(fid)["status"] == "succeeded"


def test_hosts_already_at_the_target_are_skipped(cast, agent_for):
    agent_for(cast.host_online, cast.host_online_token, SERVER_VERSION)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    fu = fleet.start("admin", host_ids=[cast.host_online.id, cast.host_behind.id])
    drive()
    assert statuses(fu.id) == ["skipped", "running"]
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="done")
    drive()
    assert rollout(fu.id)["status"] == "succeeded"


def test_cancel_stops_before_the_next_dispatch_and_lets_the_in_flight_job_finish(cast, agent_for):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fu = fleet.start("admin")
    drive()
    fleet.cancel(fu.id, "admin")
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="in-flight job ends")
    drive()
    r = rollout(fu.id)
    assert r["status"] == "cancelled"
    assert statuses(fu.id) == ["succeeded", "cancelled"]
    assert a2.inbox.empty()
    assert "fleet.update_cancelled" in fleet_actions()
    with pytest.raises(Refusal) as e:
        fleet.cancel(fu.id, "admin")
    assert e.value.code == "fleet_update_not_running"


def test_two_admins_starting_at_once_get_one_rollout_and_one_409(cast, app):
    barrier = threading.Barrier(2)
    outcomes = []

    def start():
        with app.app_context():
            barrier.wait()
            try:
                fleet.start("admin")
                outcomes.append("ok")
            except Refusal as e:
                outcomes.append((e.status, e.code))
            finally:
                db.session.remove()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes, key=str) == sorted(["ok", (409, "fleet_update_running")], key=str)
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(FleetUpdate.id))) == 1


def test_a_restarted_server_resumes_the_rollout_without_a_duplicate_dispatch(cast, agent_for, app):
    h2, t2 = second_behind_host(cast)
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    a2 = agent_for(h2, t2, OLD_VERSION)
    fu = fleet.start("admin")
    drive()
    # What a restart loses: every in-memory cache. The database keeps the rollout.
    runtime(app).inflight.reload()
    drive()
    assert statuses(fu.id) == ["running", "pending"]
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(Job.id))) == 1
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="host 1 done")
    drive()
    job2 = finish_update(a2)
    wait_until(lambda: job_status(job2) == "succeeded", what="host 2 done")
    drive()
    assert rollout(fu.id)["status"] == "succeeded"


def test_explicit_host_ids_roll_in_the_given_order_and_unknown_ids_are_422(cast):
    with pytest.raises(Refusal) as e:
        fleet.start("admin", host_ids=[cast.host_behind.id, 424242])
    assert (e.value.status, e.value.code) == (422, "unknown_host_ids")
    with pytest.raises(Refusal) as e:
        fleet.start("admin", host_ids=["x"])
    assert (e.value.status, e.value.code) == (400, "invalid_host_ids")  # malformed, not unknown
    fu = fleet.start("admin", host_ids=[cast.host_offline.id, cast.host_behind.id])
    assert [h["name"] for h in rollout(fu.id)["hosts"]] == ["db-1", "app-1"]


def test_no_behind_hosts_is_422(cast, app):
    app.config["SERVER_VERSION"] = OLD_VERSION
    db.session.execute(sa.update(Host).values(agent_version=OLD_VERSION))
    db.session.commit()
    with pytest.raises(Refusal) as e:
        fleet.start("admin")
    assert (e.value.status, e.value.code) == (422, "no_hosts_to_update")


def test_a_later_successful_rollout_resolves_the_halt_alert(cast, agent_for, clock):
    fu = fleet.start("admin", host_ids=[cast.host_behind.id])
    drive()
    clock.advance(31)
    drive()
    assert rollout(fu.id)["status"] == "halted" and len(open_halt_alerts()) == 1
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    fu2 = fleet.start("admin")
    drive()
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="done")
    drive()
    assert rollout(fu2.id)["status"] == "succeeded"
    assert open_halt_alerts() == []


def test_a_host_rolled_back_after_its_success_marks_a_finished_rollout_halted(cast, agent_for):
    a1 = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    fid = fleet.start("admin", host_ids=[cast.host_behind.id]).id
    drive()
    job = finish_update(a1)
    wait_until(lambda: job_status(job) == "succeeded", what="done")
    drive()
    assert rollout(fid)["status"] == "succeeded"
    a1.disconnect()
    a1.connect(version=OLD_VERSION, last_update={"job_id": job, "outcome": "rolled_back", "error": "never committed"})
    wait_until(lambda: rollout(fid)["status"] == "halted", what="the rollout record corrected")
    r = rollout(fid)
    assert statuses(fid) == ["failed"] and "never committed" in r["halt_reason"]
    assert len(open_halt_alerts()) == 1
    assert fleet_actions()[-1] == "fleet.update_halted"
