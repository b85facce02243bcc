"""One host's update: pre-checks, dispatch, and every way the watcher ends the job."""

from __future__ import annotations

import os
import threading

import pytest
import sqlalchemy as sa

from app.errors import Refusal
from app.extensions import db
from app.models import Alert, AuditEvent, Job, JobPhase
from app.runtime import runtime
from app.updates import dispatch, watcher
from app.updates.inflight import InFlightRegistry
from tests.conftest import OLD_VERSION, SERVER_VERSION
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(30)


def job_row(job_id):
    db.session.rollback()
    return db.session.get(Job, job_id)


def actions(host_name=None):
    db.session.rollback()
    q = sa.select(AuditEvent.action).order_by(AuditEvent.id)
    if host_name:
        q = q.where(AuditEvent.target == host_name)
    return db.session.scalars(q).all()


def open_alerts(kind="update_failed"):
    db.session.rollback()
    return db.session.scalars(sa.select(Alert).where(Alert.kind == kind, Alert.resolved_at.is_(None))).all()


def test_dispatch_sends_command_update_with_the_release(cast, agent_for, release):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    cmd = agent.expect("command.update")
    assert cmd.data["job_id"] == job.id
    assert cmd.data["version"] == SERVER_VERSION
    assert cmd.data["sha256"] == release.sha256 and cmd.data["size"] == release.size
    assert cmd.data["url"].startswith(f"/agent/download/{SERVER_VERSION}")
    row = job_row(job.id)
    assert (row.status, row.kind, row.actor, row.phase) == ("running", "update", "admin", "dispatched")
    assert row.params["from_version"] == OLD_VERSION
    assert "host.update_dispatched" in actions(cast.host_behind.name)


def test_a_hello_at_the_target_succeeds_the_job_and_resolves_the_alert(cast, agent_for, app):
    Alert.raise_or_touch("update_failed", str(cast.host_behind.id), "earlier failure", host_id=cast.host_behind.id)
    db.session.commit()
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    for phase in ("downloading", "verifying", "staging", "restarting"):
        agent.send("update.progress", job_id=job.id, phase=phase, bytes_done=10, bytes_total=10)
    wait_until(lambda: job_row(job.id).phase == "restarting", what="restarting phase")
    agent.disconnect()
    agent.connect(version=SERVER_VERSION, last_update={"job_id": job.id, "outcome": "swapped", "error": None})
    wait_until(lambda: job_row(job.id).status == "succeeded", what="job succeeded")
    assert job_row(job.id).finished_at is not None
    assert open_alerts() == []
    assert actions(cast.host_behind.name)[-1] == "host.update_succeeded"
    assert runtime(app).inflight.get(cast.host_behind.id) is None


def test_the_success_is_on_record_when_the_agent_is_welcomed(cast, agent_for, app):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.send("update.progress", job_id=job.id, phase="restarting", bytes_done=10, bytes_total=10)
    agent.disconnect()
    agent.connect(version=SERVER_VERSION, last_update={"job_id": job.id, "outcome": "swapped", "error": None})
    # no waiting: the claim is part of the hello's own commit, which the welcome follows
    assert job_row(job.id).status == "succeeded"
    assert actions(cast.host_behind.name)[-1] == "host.update_succeeded"
    phases = db.session.scalars(sa.select(JobPhase.phase).where(JobPhase.job_id == job.id))
    assert list(phases) == ["restarting"]  # the report queued before the hello was committed with or before it


def test_an_agent_failure_report_fails_the_job_at_once(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.send("update.result", job_id=job.id, ok=False, error="sha256 mismatch: expected aa, got bb")
    wait_until(lambda: job_row(job.id).status == "failed", what="job failed")
    assert job_row(job.id).error == "sha256 mismatch: expected aa, got bb"
    alerts = open_alerts()
    assert len(alerts) == 1 and "sha256 mismatch" in alerts[0].message
    assert alerts[0].host_id == cast.host_behind.id
    assert "host.update_failed" in actions(cast.host_behind.name)


def test_coming_back_at_another_version_after_restarting_fails_the_job(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.send("update.progress", job_id=job.id, phase="restarting", bytes_done=1, bytes_total=1)
    wait_until(lambda: job_row(job.id).phase == "restarting", what="restarting")
    agent.disconnect()
    agent.connect(version=OLD_VERSION)
    wait_until(lambda: job_row(job.id).status == "failed", what="job failed")
    assert "came back at version 1.0.0 instead of 2.0.0" in job_row(job.id).error


def test_a_rollback_reported_in_hello_fails_the_job_with_its_reason(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.disconnect()
    agent.connect(
        version=OLD_VERSION,
        last_update={"job_id": job.id, "outcome": "rolled_back", "error": "new program never reached the server"},
    )
    wait_until(lambda: job_row(job.id).status == "failed", what="job failed")
    assert "rolled_back: new program never reached the server" in job_row(job.id).error


def test_a_link_blip_before_the_swap_leaves_the_job_running(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.disconnect()
    agent.connect(version=OLD_VERSION)
    assert job_row(job.id).status == "running"


def test_the_deadline_fails_the_job_and_a_late_hello_resolves_only_the_alert(cast, agent_for, clock):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    clock.advance(89)
    assert watcher.sweep_timeouts() == 0
    clock.advance(2)
    assert watcher.sweep_timeouts() == 1
    row = job_row(job.id)
    assert row.status == "failed"
    assert row.error == "timed out after 90 s waiting for version 2.0.0"
    assert len(open_alerts()) == 1
    agent.disconnect()
    agent.connect(version=SERVER_VERSION)
    wait_until(lambda: open_alerts() == [], what="alert resolved")
    assert job_row(job.id).status == "failed"


@pytest.mark.parametrize(
    "who,status,code",
    [
        ("host_offline", 409, "host_offline"),
        ("host_online", 409, "already_current"),
    ],
)
def test_prechecks_refuse_with_a_typed_error(cast, who, status, code, agent_for):
    if who == "host_online":
        agent_for(cast.host_online, cast.host_online_token, SERVER_VERSION)
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(getattr(cast, who).id, "admin")
    assert (e.value.status, e.value.code) == (status, code)
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(Job.id))) == 0


def test_an_agent_without_the_update_capability_is_told_apart_up_front(cast, agent_for):
    agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION, capabilities=())
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(cast.host_behind.id, "admin")
    assert (e.value.status, e.value.code) == (422, "agent_cannot_update")


def test_unknown_host_is_404(cast, live):
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(999999, "admin")
    assert (e.value.status, e.value.code) == (404, "host_not_found")


def test_a_second_dispatch_while_one_runs_is_refused(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(cast.host_behind.id, "admin")
    assert e.value.code == "update_in_progress"


def test_two_simultaneous_dispatches_give_exactly_one_job(cast, agent_for, app):
    agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    host_id = cast.host_behind.id
    barrier = threading.Barrier(4)
    outcomes = []

    def press():
        with app.app_context():
            barrier.wait()
            try:
                dispatch.dispatch_update(host_id, "admin")
                outcomes.append("ok")
            except Refusal as e:
                outcomes.append(e.code)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=press) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["ok"] + ["update_in_progress"] * 3
    db.session.rollback()
    assert db.session.scalar(sa.select(sa.func.count(Job.id)).where(Job.host_id == host_id)) == 1


def test_progress_reports_are_stored_on_the_job(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.send("update.progress", job_id=job.id, phase="downloading", bytes_done=2048, bytes_total=4096)
    wait_until(lambda: job_row(job.id).bytes_done == 2048, what="progress stored")
    assert (job_row(job.id).phase, job_row(job.id).bytes_total) == ("downloading", 4096)


def test_a_repeated_phase_is_written_at_most_every_interval_and_a_new_phase_at_once(cast, agent_for, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(watcher.progress_gate, "clock", lambda: now[0])
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")

    def progress(phase, done):
        agent.send("update.progress", job_id=job.id, phase=phase, bytes_done=done, bytes_total=4096)

    progress("downloading", 0)
    wait_until(lambda: job_row(job.id).phase == "downloading", what="first report of a phase stored")
    progress("downloading", 1024)  # same phase, within the interval: not written
    agent.send("ping")  # one socket's frames are handled in order: the pong says the report was handled
    agent.expect("pong")
    assert job_row(job.id).bytes_done == 0
    now[0] += watcher.PROGRESS_WRITE_S
    progress("downloading", 2048)  # the interval has passed: written
    wait_until(lambda: job_row(job.id).bytes_done == 2048, what="report after the interval stored")
    progress("verifying", 4096)  # a new phase within the interval: written at once, with its job_phases row
    wait_until(lambda: job_row(job.id).phase == "verifying", what="new phase stored")
    db.session.rollback()
    phases = db.session.scalars(sa.select(JobPhase.phase).where(JobPhase.job_id == job.id).order_by(JobPhase.id))
    assert list(phases) == ["downloading", "verifying"]


def test_the_in_flight_registry_is_rebuilt_from_the_jobs_table(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    fresh = InFlightRegistry()
    entry = fresh.get(cast.host_behind.id)
    assert entry.job_id == job.id and entry.target_version == SERVER_VERSION and not entry.restarting


def test_an_agent_ahead_of_the_server_is_only_downgraded_when_asked(cast, agent_for, release):
    agent = agent_for(cast.host_behind, cast.host_behind_token, "3.0.0")
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(cast.host_behind.id, "admin")
    assert e.value.code == "already_current" and "allow_downgrade" in e.value.message
    job = dispatch.dispatch_update(cast.host_behind.id, "admin", allow_downgrade=True)
    cmd = agent.expect("command.update")
    assert cmd.data["allow_downgrade"] is True and cmd.data["job_id"] == job.id


def test_the_api_passes_allow_downgrade_and_rejects_a_non_boolean(cast, agent_for, app):
    agent_for(cast.host_behind, cast.host_behind_token, "3.0.0")
    client = app.test_client()
    client.post("/login", data={"username": "admin", "password": "admin-pass-123"})
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", json={"allow_downgrade": "yes"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_field"
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", json={})
    assert r.status_code == 409 and r.json["error"]["code"] == "already_current"
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", json={"allow_downgrade": True})
    assert r.status_code == 202 and r.json["job"]["status"] == "running"


def test_a_rollback_after_the_success_hello_turns_the_job_into_a_failure(cast, agent_for):
    agent = agent_for(cast.host_behind, cast.host_behind_token, OLD_VERSION)
    job = dispatch.dispatch_update(cast.host_behind.id, "admin")
    agent.expect("command.update")
    agent.disconnect()
    agent.connect(version=SERVER_VERSION, last_update={"job_id": job.id, "outcome": "swapped", "error": None})
    wait_until(lambda: job_row(job.id).status == "succeeded", what="succeeded")
    agent.disconnect()
    agent.connect(
        version=OLD_VERSION,
        last_update={"job_id": job.id, "outcome": "rolled_back", "error": "new version never committed"},
    )
    wait_until(lambda: job_row(job.id).status == "failed", what="corrected to failed")
    assert "rolled back after its hello at the target: new version never committed" in job_row(job.id).error
    assert len(open_alerts()) == 1
    assert actions(cast.host_behind.name)[-1] == "host.update_failed"


def test_a_kept_older_release_can_be_dispatched_as_an_explicit_downgrade(cast, agent_for, release, tmp_path):
    """A revert's dispatch: another version than the server's, from the releases the server kept."""
    from app.updates import releases

    old = tmp_path / "old.pyz"
    old.write_bytes(os.urandom(2048))
    kept = releases.register(str(old), OLD_VERSION)
    agent = agent_for(cast.host_behind, cast.host_behind_token, SERVER_VERSION)
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(cast.host_behind.id, "admin", version=OLD_VERSION)
    assert e.value.code == "already_current" and f"newer than {OLD_VERSION}" in e.value.message
    with pytest.raises(Refusal) as e:
        dispatch.dispatch_update(cast.host_behind.id, "admin", allow_downgrade=True, version="0.0.1")
    assert (e.value.status, e.value.code) == (503, "release_unavailable") and "0.0.1" in e.value.message
    assert job_row_count() == 0
    job = dispatch.dispatch_update(cast.host_behind.id, "admin", allow_downgrade=True, version=OLD_VERSION)
    cmd = agent.expect("command.update")
    assert (cmd.data["version"], cmd.data["sha256"], cmd.data["allow_downgrade"]) == (OLD_VERSION, kept.sha256, True)
    assert cmd.data["url"].startswith(f"/agent/download/{OLD_VERSION}")
    assert job_row(job.id).params["from_version"] == SERVER_VERSION
    old.unlink()  # a release whose file is gone is not kept any more
    assert releases.kept_release(OLD_VERSION) is None


def job_row_count():
    db.session.rollback()
    return db.session.scalar(sa.select(sa.func.count(Job.id)))
