"""Which events notify: new alerts (not touches), rollouts that finish; only once committed, never sent inline."""

from __future__ import annotations

import pytest

from app.extensions import db
from app.models import Alert, Job
from app.runtime import runtime
from app.updates import fleet, watcher
from tests.notify.conftest import PUBLIC_URL

pytestmark = pytest.mark.timeout(30)


def drive():
    db.session.rollback()
    while fleet.tick():
        pass


def sent(app, receiver, n):
    """Let the notifier deliver what is queued; return the events the receiver accepted (checked signatures)."""
    runtime(app).notifier.drain()
    return [c["json"] for c in receiver.wait_for(lambda calls: len(calls) >= n)]


@pytest.fixture
def announced(app):
    seen = []
    rt = runtime(app)
    rt.alert_raised.subscribe(lambda a: seen.append(("alert", a["kind"], a["dedup_key"])))
    rt.fleet_finished.subscribe(lambda s: seen.append(("fleet", s["id"], s["status"])))
    return seen


def test_a_new_alert_is_announced_once_its_transaction_commits(app, cast, announced):
    Alert.raise_or_touch("update_failed", "42", "Agent update of x failed")
    assert announced == []  # the savepoint is released, the transaction is not committed
    db.session.commit()
    assert announced == [("alert", "update_failed", "42")]


def test_touching_an_open_alert_announces_nothing(app, cast, announced):
    Alert.raise_or_touch("update_failed", "42", "first")
    db.session.commit()
    Alert.raise_or_touch("update_failed", "42", "again")
    db.session.commit()
    assert announced == [("alert", "update_failed", "42")]
    assert db.session.scalar(db.select(Alert.count)) == 2


def test_an_alert_rolled_back_is_never_announced(app, cast, announced):
    Alert.raise_or_touch("update_failed", "42", "never committed")
    db.session.rollback()
    db.session.commit()
    assert announced == []
    Alert.raise_or_touch("update_failed", "42", "a session closed without commit")
    db.session.remove()
    db.session.commit()
    assert announced == []


def test_a_failed_update_job_sends_update_failed_with_the_host_and_a_link(app, cast, receiver):
    job = Job(host_id=cast.host_behind.id, kind="update", status="running", params={"version": "2.0.0"})
    db.session.add(job)
    db.session.commit()
    assert watcher.fail_job(job.id, "sha256 mismatch")
    assert runtime(app).notifier.pending() == 1  # queued, not sent on this thread
    assert receiver.calls == 0
    (ev,) = sent(app, receiver, 1)
    assert ev["event"] == "alert.raised" and ev["level"] == "failure"
    assert ev["alert"]["kind"] == "update_failed" and ev["alert"]["host"] == "app-1"
    assert ev["title"] == "Agent update failed: app-1"
    assert "sha256 mismatch" in ev["text"]
    assert ev["url"] == f"{PUBLIC_URL}/hosts/{cast.host_behind.id}"


def test_a_halted_rollout_sends_the_halt_alert_and_the_finished_summary(app, cast, receiver, clock):
    fid = fleet.start("admin", host_ids=[cast.host_online.id, cast.host_behind.id]).id  # app-1: no agent
    drive()
    clock.advance(31)  # past the offline grace
    drive()
    assert fleet.running() is None
    events = sent(app, receiver, 2)
    assert [e["event"] for e in events] == ["alert.raised", "fleet_update.finished"]
    alert, done = events
    assert alert["alert"]["kind"] == "fleet_update_halted" and alert["url"] == f"{PUBLIC_URL}/alerts"
    summary = done["fleet_update"]
    assert summary["id"] == fid and summary["status"] == "halted"
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["failed"] == 1 and summary["total"] == 2
    assert "app-1" in summary["halt_reason"] and summary["wall_time_s"] == 31.0
    assert done["url"] == f"{PUBLIC_URL}/settings/fleet-update/{fid}/report"  # the run report's page
    assert done["api_url"] == f"{PUBLIC_URL}/api/fleet-updates/{fid}"
    assert done["report_url"] == f"{PUBLIC_URL}/api/fleet-updates/{fid}/report"
    assert done["url"] in done["text"]
    assert done["title"] == f"Fleet update {fid} to 2.0.0 halted"
    assert "1 failed, 1 skipped (2 hosts) in 31s" in done["text"]


def test_a_succeeded_rollout_sends_its_summary(app, cast, receiver):
    fid = fleet.start("admin", host_ids=[cast.host_behind.id]).id
    cast.host_behind.agent_version = "2.0.0"  # updated by other means before its turn: skipped
    db.session.commit()
    drive()
    (ev,) = sent(app, receiver, 1)
    assert ev["event"] == "fleet_update.finished" and ev["level"] == "success"
    assert ev["fleet_update"]["status"] == "succeeded" and ev["fleet_update"]["id"] == fid
    assert ev["fleet_update"]["counts"]["skipped"] == 1


def test_a_cancelled_rollout_sends_its_summary(app, cast, receiver):
    fid = fleet.start("admin", host_ids=[cast.host_behind.id]).id
    fleet.cancel(fid, "admin")
    (ev,) = sent(app, receiver, 1)
    assert ev["fleet_update"]["status"] == "cancelled" and ev["fleet_update"]["counts"]["cancelled"] == 1


def test_a_destination_that_is_down_never_holds_up_the_rollout(app, cast, clock):
    from app.notify import Notifier, Webhook
    from tests.support.receivers import free_port

    rt = runtime(app)
    rt.notifier = Notifier([Webhook(f"http://127.0.0.1:{free_port()}/", "x" * 16)], rt.clock.now, attempts=3)
    fleet.start("admin", host_ids=[cast.host_behind.id])
    drive()
    clock.advance(31)
    drive()  # the halt queues two events and returns: nothing is sent on the tick's thread
    assert fleet.history()[0].status == "halted"
    assert rt.notifier.pending() == 2
    assert all(s.last_attempt_at is None for s in rt.notifier.status())


def test_on_commit_waits_for_the_outer_transaction_not_a_savepoint(app, cast):
    from app.oncommit import on_commit

    ran = []
    on_commit(ran.append, "outer")
    with db.session.begin_nested():
        on_commit(ran.append, "inside the savepoint")
    assert ran == []  # the savepoint was released; the transaction is still open
    db.session.commit()
    assert ran == ["outer", "inside the savepoint"]
    db.session.commit()
    assert ran == ["outer", "inside the savepoint"]  # run once, not on every later commit


def test_a_failing_after_commit_callback_is_logged_and_the_others_still_run(app, cast, caplog):
    from app.oncommit import on_commit

    ran = []

    def boom():
        raise RuntimeError("subscriber bug")

    on_commit(boom)
    on_commit(ran.append, "after")
    db.session.commit()
    assert ran == ["after"]
    assert any("after-commit callback" in r.message for r in caplog.records)
