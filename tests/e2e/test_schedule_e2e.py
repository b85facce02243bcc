"""A scheduled start and maintenance windows for real: a server process stopped across the start
time and killed after it, real agents, one window open now and one closed now."""

from __future__ import annotations

import datetime as dt
import signal
import time

import pytest

from app.extensions import db
from app.models import FleetUpdate, Host
from app.updates import schedule
from app.updates.selection import Selector
from tests.support.wait import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

A, B = "1.0.0", "2.0.0"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _hhmm(t: dt.datetime) -> str:
    return t.strftime("%H:%M")


def _window(api, name, start, end, labels):
    body = {"name": name, "days": list(range(7)), "start": start, "end": end, "timezone": "UTC", "labels": labels}
    r = api.post_json("/api/maintenance-windows", body)
    assert r.status_code == 201, r.text
    return r.json()["maintenance_window"]


def test_a_scheduled_start_survives_restarts_and_hosts_wait_for_their_window(live_fleet, app):
    live_fleet.seed(["node-1", "node-2"])
    for host_id, side in zip(live_fleet.host_ids, ("open", "closed"), strict=True):
        db.session.get(Host, host_id).labels = {"window": side}
    db.session.commit()
    # A due rollout waits RM_FLEET_OFFLINE_GRACE_S (30 s by default) after a restart for agents to
    # reconnect; these agents retry within a second (backoff_max_s = 1), so 5 s is plenty.
    server = live_fleet.start_server(RM_FLEET_TICK_S="0.2", RM_UPDATE_TIMEOUT="30", RM_FLEET_OFFLINE_GRACE_S="5")
    live_fleet.start_agents()
    api, ids = live_fleet.api(), live_fleet.host_ids
    wait_until(lambda: api.all_online(ids), 60, what="agents online")

    now = _utcnow()
    _window(
        api, "open now", _hhmm(now - dt.timedelta(minutes=5)), _hhmm(now + dt.timedelta(hours=1)), {"window": "open"}
    )
    later = _window(
        api, "closed now", _hhmm(now + dt.timedelta(hours=2)), _hhmm(now + dt.timedelta(hours=3)), {"window": "closed"}
    )
    assert later["open_now"] is False

    # The server is down at the start time: scheduled a moment ahead, while it is stopped.
    server.stop()
    start_at = (_utcnow() + dt.timedelta(seconds=1)).replace(microsecond=0)  # within the next second
    fid = schedule.create("admin", Selector(), start_at, "UTC", True).id
    db.session.remove()
    wait_until(lambda: _utcnow() > start_at + dt.timedelta(seconds=0.3), 10, 0.05, "the start time to pass")
    assert db.session.get(FleetUpdate, fid).status == "scheduled"  # nothing started it meanwhile
    db.session.remove()

    server.start()  # ... and the first tick after it comes back starts the overdue rollout
    fu = wait_until(
        lambda: (
            (f := api.fleet_update(fid))["status"] == "running"
            and f["hosts"]
            and f["hosts"][0]["status"] == "succeeded"
            and f
        ),
        120,
        0.1,
        "node-1 updated inside its open window",
    )
    assert fu["started_at"] >= start_at.isoformat() + "Z"
    assert [h["name"] for h in fu["hosts"]] == ["node-1", "node-2"]
    assert fu["hosts"][1]["status"] == "pending"  # outside its window: waiting, not failed, not halted
    assert fu["window_waits"] == [
        {"host_id": ids[1], "name": "node-2", "window": "closed now", "opens_at": later["next_open"]}
    ]
    assert api.audit_actions().count("fleet.update_started") == 1

    # Killed and started again: the start is not repeated; node-2 still waits for its window.
    server.stop(signal.SIGKILL)
    server.start()
    wait_until(lambda: api.all_online(ids), 60, what="agents back online")
    time.sleep(1.0)  # several fleet ticks (0.2 s) pass
    fu = api.fleet_update(fid)
    assert fu["status"] == "running" and [h["status"] for h in fu["hosts"]] == ["succeeded", "pending"]
    assert api.audit_actions().count("fleet.update_started") == 1
    assert len(api.jobs(ids[0])) == 1 and api.jobs(ids[1]) == []

    # Its window opens (moved to now): node-2 goes within a tick or two, and the rollout succeeds.
    r = api.http.patch(
        api.base + f"/api/maintenance-windows/{later['id']}",
        json={"start": _hhmm(_utcnow() - dt.timedelta(minutes=1)), "end": _hhmm(_utcnow() + dt.timedelta(hours=1))},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["maintenance_window"]["open_now"] is True, r.text
    fu = wait_until(lambda: api.fleet_update_ended(fid), 120, 0.1, "the rollout to finish")
    assert fu["status"] == "succeeded" and fu["window_waits"] == []
    wait_until(lambda: [api.host(i)["agent_version"] for i in ids] == [B, B], 30, what="both hosts at B")
    assert api.audit_actions().count("fleet.update_started") == 1
