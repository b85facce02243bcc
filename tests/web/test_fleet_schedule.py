"""Scheduled rollouts and maintenance windows in a rollout, driven by an injected clock.

The fake clock starts on Thursday 2026-01-01 12:00 UTC. ``schedule.start_due()`` is what the
scheduler's fleet job runs before each tick; ``fleet.tick()`` advances the running rollout.
"""

from __future__ import annotations

import datetime as dt

import pytest

from app.extensions import db
from app.models import AuditEvent, FleetUpdate, Host, Job
from app.updates import fleet, maintenance, schedule
from tests.web.helpers import HX, audit_actions, bearer, error_code

NOW = dt.datetime(2026, 1, 1, 12, 0)


def _fleet(fleet_id) -> FleetUpdate:
    db.session.expire_all()
    return db.session.get(FleetUpdate, fleet_id)


def _schedule(client, token, **body):
    r = client.post("/api/fleet/update", json=body, headers=bearer(token))
    assert r.status_code == 201, r.get_json()
    return r.get_json()["fleet_update"]


def _audit(action: str) -> list[AuditEvent]:
    db.session.expire_all()
    return list(db.session.scalars(db.select(AuditEvent).where(AuditEvent.action == action)))


# --- creating a scheduled rollout -----------------------------------------------------------------


def test_a_rollout_with_start_at_is_scheduled_and_takes_no_host_yet(client, cast, admin_token):
    fu = _schedule(client, admin_token, start_at="2026-01-01T13:00:00Z")
    assert fu["status"] == "scheduled" and fu["start_at"] == "2026-01-01T13:00:00Z" and fu["start_tz"] == "UTC"
    assert fu["hosts"] == [] and fu["started_at"] is None and fu["respect_windows"] is False
    (ev,) = _audit("fleet.update_scheduled")
    assert ev.details["start_at"] == "2026-01-01T13:00:00Z" and ev.details["hosts_now"] == ["app-1"]
    assert "fleet.update_started" not in audit_actions()
    listed = client.get("/api/fleet-updates", headers=bearer(admin_token)).get_json()["fleet_updates"]
    assert [(f["id"], f["status"], f["waiting_for"]) for f in listed] == [(fu["id"], "scheduled", None)]


@pytest.mark.parametrize(
    "start_at,timezone,utc,shown",
    [
        ("2026-01-02T03:00:00+01:00", None, "2026-01-02T02:00:00Z", "+0100"),
        ("2026-01-02T03:00:00+01:00", "Europe/Berlin", "2026-01-02T02:00:00Z", "Europe/Berlin"),
        ("2026-01-02T03:00:00", "America/New_York", "2026-01-02T08:00:00Z", "America/New_York"),
        # 02:30 does not exist in Berlin on 29 March 2026: the windows' rule, the moment clocks jump.
        ("2026-03-29T02:30:00", "Europe/Berlin", "2026-03-29T01:00:00Z", "Europe/Berlin"),
        # 02:30 happens twice on 25 October 2026: its first occurrence (CEST).
        ("2026-10-25T02:30:00", "Europe/Berlin", "2026-10-25T00:30:00Z", "Europe/Berlin"),
    ],
)
def test_start_at_with_an_offset_or_a_zone(client, cast, admin_token, start_at, timezone, utc, shown):
    body = {"start_at": start_at} | ({"timezone": timezone} if timezone else {})
    fu = _schedule(client, admin_token, **body)
    assert (fu["start_at"], fu["start_tz"]) == (utc, shown)


@pytest.mark.parametrize(
    "body,status,code,needle",
    [
        ({"start_at": "2026-01-02T03:00:00"}, 422, "invalid_start_at", "no UTC offset"),
        ({"start_at": "2026-01-01T11:59:59Z"}, 422, "invalid_start_at", "not in the future"),
        ({"start_at": "2028-01-01T00:00:00Z"}, 422, "invalid_start_at", "a year ahead"),
        ({"start_at": "2026-02-30T00:00:00Z"}, 422, "invalid_start_at", "not a date that exists"),
        ({"start_at": "tomorrow"}, 400, "invalid_start_at", "ISO 8601"),
        ({"start_at": "2026-01-02"}, 400, "invalid_start_at", "ISO 8601"),
        ({"start_at": 1767272400}, 400, "invalid_start_at", "ISO 8601"),
        ({"start_at": "2026-01-02T03:00:00", "timezone": "Mars/Base"}, 400, "invalid_timezone", "Mars/Base"),
        ({"timezone": "UTC"}, 422, "invalid_start_at", "only goes with start_at"),
        ({"start_at": "2026-01-02T03:00:00Z", "respect_windows": "yes"}, 400, "invalid_field", "respect_windows"),
    ],
)
def test_bad_schedules_are_refused_and_nothing_is_written(client, cast, admin_token, body, status, code, needle):
    r = client.post("/api/fleet/update", json=body, headers=bearer(admin_token))
    assert r.status_code == status and error_code(r) == code and needle in r.get_json()["error"]["message"]
    assert db.session.scalar(db.select(db.func.count(FleetUpdate.id))) == 0


def test_several_rollouts_may_be_scheduled_and_one_can_run_meanwhile(client, cast, admin_token):
    a = _schedule(client, admin_token, start_at="2026-01-01T14:00:00Z")
    b = _schedule(client, admin_token, start_at="2026-01-01T13:00:00Z")
    now = _schedule(client, admin_token)
    assert now["status"] == "running"
    assert [f.id for f in schedule.scheduled()] == [b["id"], a["id"]]


# --- starting it ------------------------------------------------------------------------------------


def test_it_starts_when_due_with_the_hosts_of_that_moment_once(client, app, cast, admin_token, clock, online, release):
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:10:00Z")
    # Between scheduling and the start, another host falls behind: the rollout takes it too.
    cast.host_online.agent_version = "1.0.0"
    db.session.commit()
    clock.advance(9 * 60)
    assert schedule.start_due() is False and _fleet(fu["id"]).status == "scheduled"
    clock.advance(60)
    assert schedule.start_due() is True
    started = _fleet(fu["id"])
    assert started.status == "running" and started.started_at == NOW + dt.timedelta(minutes=10)
    assert [r.name for r in started.hosts] == ["app-1", "web-1"]
    (ev,) = _audit("fleet.update_started")
    assert (
        ev.actor == "system"
        and ev.details["scheduled_by"].startswith("admin")
        and ev.details["hosts"]
        == [
            "app-1",
            "web-1",
        ]
    )
    assert schedule.start_due() is False  # never a second start
    assert fleet.tick() is True
    assert db.session.scalar(db.select(Job.id).where(Job.host_id == cast.host_behind.id)) is not None
    assert len(_audit("fleet.update_started")) == 1


def test_a_due_rollout_waits_for_the_running_one_and_says_so(client, cast, admin_token, clock, online):
    running = _schedule(client, admin_token)
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:05:00Z")
    clock.advance(600)
    assert schedule.start_due() is False
    got = client.get(f"/api/fleet-updates/{fu['id']}", headers=bearer(admin_token)).get_json()["fleet_update"]
    assert got["status"] == "scheduled"
    assert got["waiting_for"] == f"due since 2026-01-01T12:05:00Z: waits for rollout {running['id']} to finish"
    fleet.cancel(running["id"], "admin")
    assert schedule.start_due() is True and _fleet(fu["id"]).status == "running"


def test_a_scheduled_rollout_is_cancelled_before_it_starts_and_never_starts(client, cast, admin_token, clock):
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:05:00Z")
    r = client.post(f"/api/fleet-updates/{fu['id']}/cancel", json={}, headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["fleet_update"]["status"] == "cancelled"
    (ev,) = _audit("fleet.update_cancelled")
    assert ev.details["was"] == "scheduled"
    clock.advance(600)
    assert schedule.start_due() is False and _fleet(fu["id"]).status == "cancelled"
    r = client.post(f"/api/fleet-updates/{fu['id']}/cancel", json={}, headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "fleet_update_not_running"


def test_nothing_to_update_at_the_start_ends_it_succeeded_without_hosts(client, cast, admin_token, clock):
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:05:00Z")
    cast.host_behind.agent_version = "2.0.0"  # someone updated it by hand meanwhile
    db.session.commit()
    clock.advance(600)
    assert schedule.start_due() is True
    done = _fleet(fu["id"])
    assert done.status == "succeeded" and done.hosts == [] and done.halt_reason is None


def test_hosts_it_cannot_take_at_the_start_halt_it_with_the_reason(client, cast, admin_token, clock):
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:05:00Z")
    cast.host_behind.connected = False  # offline at the start: the default selection leaves it out
    db.session.commit()
    clock.advance(600)
    assert schedule.start_due() is True
    done = _fleet(fu["id"])
    assert done.status == "halted" and "could not start at 2026-01-01T12:10:00Z" in done.halt_reason
    assert "offline" in done.halt_reason
    assert "fleet.update_halted" in audit_actions()


def test_a_server_upgraded_before_the_start_halts_the_old_target(client, app, cast, admin_token, clock):
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:05:00Z")
    app.config["SERVER_VERSION"] = "3.0.0"
    clock.advance(600)
    assert schedule.start_due() is True
    assert "the server now runs 3.0.0, not 2.0.0" in _fleet(fu["id"]).halt_reason


# --- the page -------------------------------------------------------------------------------------


def test_the_fleet_page_lists_scheduled_rollouts_with_a_cancel_button(as_admin, client, cast, clock):
    from app.updates.selection import Selector

    fu = schedule.create("admin", Selector(), NOW + dt.timedelta(hours=2), "Europe/Berlin", True)
    html = as_admin.get("/settings/fleet-update").get_data(as_text=True)
    row = html[html.index(f'data-scheduled="{fu.id}"') :]
    row = row[: row.index("</tr>")]
    assert "2026-01-01 14:00:00" in row and "Europe/Berlin" in row and "respected" in row
    assert f"fleet-scheduled-cancel-{fu.id}" in row
    r = as_admin.post(f"/settings/fleet-update/{fu.id}/cancel", headers=HX)
    assert r.status_code == 204 and _fleet(fu.id).status == "cancelled"


def test_viewers_see_scheduled_rollouts_without_cancel(as_viewer, cast):
    from app.updates.selection import Selector

    fu = schedule.create("admin", Selector(), NOW + dt.timedelta(hours=2), "UTC", False)
    html = as_viewer.get("/settings/fleet-update").get_data(as_text=True)
    assert f'data-scheduled="{fu.id}"' in html and f"fleet-scheduled-cancel-{fu.id}" not in html


# --- respect_windows --------------------------------------------------------------------------------


def _window(name, start, end, labels=None, days=(3,)):
    return maintenance.create(
        "admin",
        {"name": name, "days": list(days), "start": start, "end": end, "timezone": "UTC", "labels": labels or {}},
    )


def test_a_host_outside_its_window_waits_and_the_api_and_page_say_until_when(
    client, as_admin, cast, admin_token, clock, online, release
):
    cast.host_behind.labels = {"site": "fra"}
    db.session.commit()
    _window("fra nights", "13:00", "14:00", {"site": "fra"})  # Thursdays 13:00-14:00 UTC
    _window("elsewhere", "00:00", "01:00", {"site": "ams"})
    fu = _schedule(client, admin_token, respect_windows=True)
    assert fu["respect_windows"] is True
    assert fleet.tick() is False  # app-1 waits; the rollout neither dispatches nor halts
    got = client.get(f"/api/fleet-updates/{fu['id']}", headers=bearer(admin_token)).get_json()["fleet_update"]
    assert got["status"] == "running"
    assert got["window_waits"] == [
        {"host_id": cast.host_behind.id, "name": "app-1", "window": "fra nights", "opens_at": "2026-01-01T13:00:00Z"}
    ]
    html = as_admin.get("/settings/fleet-update/status", headers=HX).get_data(as_text=True)
    assert "app-1 waits for window <strong>fra nights</strong>, which opens 2026-01-01 13:00 UTC" in html
    clock.advance(59 * 60)
    assert fleet.tick() is False
    clock.advance(60)  # 13:00: open
    assert fleet.tick() is True
    assert db.session.scalar(db.select(Job.id).where(Job.host_id == cast.host_behind.id)) is not None
    assert (
        client.get(f"/api/fleet-updates/{fu['id']}", headers=bearer(admin_token)).get_json()["fleet_update"][
            "window_waits"
        ]
        == []
    )
    # The run report says who waited for which window, from when until the dispatch.
    rep = client.get(f"/api/fleet-updates/{fu['id']}/report", headers=bearer(admin_token)).get_json()["report"]
    [wait] = rep["summary"]["waits"]
    assert (wait["name"], wait["reason"], wait["window"]) == ("app-1", "window", "fra nights")
    assert (wait["since"], wait["until"], wait["waited_s"]) == (
        "2026-01-01T12:00:00Z",
        "2026-01-01T13:00:00Z",
        3600.0,
    )


def test_a_host_no_window_applies_to_is_updated_at_once(client, cast, admin_token, online, release):
    _window("fra nights", "13:00", "14:00", {"site": "fra"})
    _schedule(client, admin_token, respect_windows=True)  # app-1 has no labels: no window applies
    assert fleet.tick() is True
    assert db.session.scalar(db.select(Job.id).where(Job.host_id == cast.host_behind.id)) is not None


def test_without_respect_windows_windows_change_nothing(client, cast, admin_token, online, release):
    _window("everyone, later", "13:00", "14:00")
    _schedule(client, admin_token)
    assert fleet.tick() is True
    assert db.session.scalar(db.select(Job.id).where(Job.host_id == cast.host_behind.id)) is not None


def test_a_scheduled_start_inside_windows(client, cast, admin_token, clock, online, release):
    """Both at once: a rollout scheduled for 12:30 that respects a window opening at 13:00."""
    _window("all, 13h", "13:00", "14:00")
    fu = _schedule(client, admin_token, start_at="2026-01-01T12:30:00Z", respect_windows=True)
    clock.advance(30 * 60)
    assert schedule.start_due() is True and fleet.tick() is False
    assert _fleet(fu["id"]).status == "running"
    clock.advance(30 * 60)
    assert fleet.tick() is True
    assert db.session.get(Host, cast.host_behind.id) is not None
    assert db.session.scalar(db.select(Job.id).where(Job.host_id == cast.host_behind.id)) is not None


# --- the command line -------------------------------------------------------------------------------


def test_the_cli_schedules_a_rollout_and_refuses_a_bad_time(runner, cast, clock):
    r = runner.invoke(args=["fleet", "start", "--at", "2026-01-02T03:00:00", "--timezone", "Europe/Berlin"])
    assert r.exit_code == 0, r.output
    assert "scheduled for 2026-01-02 02:00:00 UTC" in r.output
    (fu,) = schedule.scheduled()
    assert fu.start_tz == "Europe/Berlin" and fu.created_by == "cli" and fu.respect_windows is False
    r = runner.invoke(args=["fleet", "status", str(fu.id), "--json"])
    assert r.exit_code == 0 and '"status": "scheduled"' in r.output
    r = runner.invoke(args=["fleet", "start", "--at", "yesterday"])
    assert r.exit_code == 2 and "invalid_start_at" in r.output
    r = runner.invoke(args=["fleet", "start", "--respect-windows"])
    assert r.exit_code == 0 and "started over 1 host(s)" in r.output
    assert fleet.running().respect_windows is True
    r = runner.invoke(args=["fleet", "cancel", str(fu.id)])
    assert r.exit_code == 0 and _fleet(fu.id).status == "cancelled"
