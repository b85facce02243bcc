"""Maintenance windows: the JSON API, the page and the CLI (create, list, change, delete; audited)."""

from __future__ import annotations

import datetime as dt

import pytest

from app.extensions import db
from app.models import AuditEvent, MaintenanceWindow
from tests.web.helpers import HX, audit_actions, bearer, error_code

BERLIN_NIGHTS = {
    "name": "weekend nights",
    "days": [5, 6],
    "start": "02:00",
    "end": "04:00",
    "timezone": "Europe/Berlin",
    "labels": {"site": "fra"},
}


def _rows() -> list[MaintenanceWindow]:
    db.session.expire_all()
    return list(db.session.scalars(db.select(MaintenanceWindow).order_by(MaintenanceWindow.id)))


def test_an_admin_creates_a_window_and_everyone_reads_it(client, admin_token, viewer_token, clock):
    clock._now = dt.datetime(2026, 11, 28, 1, 30)  # Saturday 02:30 in Berlin (CET): open
    r = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token))
    assert r.status_code == 201
    w = r.get_json()["maintenance_window"]
    assert {k: w[k] for k in BERLIN_NIGHTS} == BERLIN_NIGHTS
    assert w["open_now"] is True
    assert w["next_close"] == "2026-11-28T03:00:00Z"
    assert w["next_open"] == "2026-11-29T01:00:00Z"
    assert w["description"] == "Sat, Sun 02:00-04:00 Europe/Berlin"
    assert w["created_by"].startswith("admin")
    listed = client.get("/api/maintenance-windows", headers=bearer(viewer_token)).get_json()["maintenance_windows"]
    assert [x["name"] for x in listed] == ["weekend nights"]
    assert client.get(f"/api/maintenance-windows/{w['id']}", headers=bearer(viewer_token)).status_code == 200
    (row,) = _rows()
    assert row.days == [5, 6] and row.labels == {"site": "fra"} and row.timezone == "Europe/Berlin"
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "maintenance_window.created"))
    assert ev.target == f"maintenance_window:{row.id}" and ev.details["start"] == "02:00"


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"days": [7]}, "days"),
        ({"start": "25:00"}, "start"),
        ({"end": "4pm"}, "end"),
        ({"timezone": "Europe/Atlantis"}, "Europe/Atlantis"),
        ({"colour": "red"}, "unknown field"),
        ({"name": None}, "name"),
    ],
)
def test_bad_windows_are_refused_with_invalid_window(client, admin_token, change, needle):
    r = client.post("/api/maintenance-windows", json={**BERLIN_NIGHTS, **change}, headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_window"
    assert needle in r.get_json()["error"]["message"]
    assert _rows() == [] and "maintenance_window.created" not in audit_actions()


def test_bad_labels_are_refused_as_host_labels_are(client, admin_token):
    r = client.post(
        "/api/maintenance-windows", json={**BERLIN_NIGHTS, "labels": {"site": "a b"}}, headers=bearer(admin_token)
    )
    assert r.status_code == 400 and error_code(r) == "invalid_labels"
    assert _rows() == []


def test_a_second_window_with_the_same_name_is_a_conflict(client, admin_token):
    assert client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token)).status_code == 201
    r = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "window_exists"
    assert len(_rows()) == 1


def test_viewers_cannot_change_windows(client, viewer_token, admin_token):
    r = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(viewer_token))
    assert r.status_code == 403
    wid = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token)).get_json()[
        "maintenance_window"
    ]["id"]
    assert client.delete(f"/api/maintenance-windows/{wid}", headers=bearer(viewer_token)).status_code == 403
    r = client.patch(f"/api/maintenance-windows/{wid}", json={"start": "01:00"}, headers=bearer(viewer_token))
    assert r.status_code == 403
    assert _rows()[0].start == "02:00"


def test_patch_changes_some_fields_validates_the_whole_and_audits_the_difference(client, admin_token):
    wid = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token)).get_json()[
        "maintenance_window"
    ]["id"]
    r = client.patch(f"/api/maintenance-windows/{wid}", json={"end": "01:00"}, headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["maintenance_window"]["end"] == "01:00"
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "maintenance_window.updated"))
    assert ev.details["changed"] == {"end": {"from": "04:00", "to": "01:00"}}
    r = client.patch(f"/api/maintenance-windows/{wid}", json={"days": []}, headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_window" and "days" in r.get_json()["error"]["message"]
    assert _rows()[0].end == "01:00"
    r = client.patch("/api/maintenance-windows/999", json={"end": "05:00"}, headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "window_not_found"


def test_delete_removes_it_audited_and_a_missing_one_is_404(client, admin_token):
    wid = client.post("/api/maintenance-windows", json=BERLIN_NIGHTS, headers=bearer(admin_token)).get_json()[
        "maintenance_window"
    ]["id"]
    assert client.delete(f"/api/maintenance-windows/{wid}", headers=bearer(admin_token)).status_code == 204
    assert _rows() == []
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "maintenance_window.deleted"))
    assert ev.details["name"] == "weekend nights"
    r = client.delete(f"/api/maintenance-windows/{wid}", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "window_not_found"


# --- the page ------------------------------------------------------------------------------------


def _form(**over):
    data = {"name": "nights", "days": ["5", "6"], "start": "02:00", "end": "04:00", "timezone": "Europe/Berlin"}
    data.update(over)
    return data


def test_an_admin_adds_a_window_on_the_page_and_sees_it_listed(as_admin):
    html = as_admin.get("/settings/maintenance-windows").get_data(as_text=True)
    assert "Add a window" in html and "No maintenance window yet" in html
    r = as_admin.post("/settings/maintenance-windows", data=_form(labels="site=fra, role=db"))
    assert r.status_code == 303 and r.headers["Location"] == "/settings/maintenance-windows"
    (row,) = _rows()
    assert row.labels == {"site": "fra", "role": "db"} and row.days == [5, 6]
    html = as_admin.get("/settings/maintenance-windows").get_data(as_text=True)
    assert 'data-window="nights"' in html and "Sat, Sun 02:00-04:00 Europe/Berlin" in html
    assert "site=fra" in html and "Delete</button>" in html
    assert "maintenance_window.created" in audit_actions()


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"timezone": "Nowhere/Land"}, "not a known IANA time zone"),
        ({"start": "2am"}, "start must be a time"),
        ({"days": []}, "days must be a non-empty list"),
        ({"labels": "site"}, "key=value"),
    ],
)
def test_a_bad_form_is_shown_again_with_the_message_and_keeps_the_input(as_admin, over, needle):
    r = as_admin.post("/settings/maintenance-windows", data=_form(**over))
    assert r.status_code == 400
    html = r.get_data(as_text=True)
    assert needle in html and 'value="nights"' in html
    assert _rows() == []


def test_a_duplicate_name_on_the_page_is_a_form_message(as_admin):
    as_admin.post("/settings/maintenance-windows", data=_form())
    r = as_admin.post("/settings/maintenance-windows", data=_form())
    assert r.status_code == 409 and "already exists" in r.get_data(as_text=True)


def test_an_admin_deletes_from_the_page_htmx_too(as_admin):
    as_admin.post("/settings/maintenance-windows", data=_form())
    wid = _rows()[0].id
    r = as_admin.post(f"/settings/maintenance-windows/{wid}/delete", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/maintenance-windows"
    assert _rows() == []
    assert as_admin.post(f"/settings/maintenance-windows/{wid}/delete").status_code == 404


def test_viewers_read_the_page_without_controls_and_get_403(as_viewer, client, cast):
    MaintenanceWindow_add(cast)
    html = as_viewer.get("/settings/maintenance-windows").get_data(as_text=True)
    assert 'data-window="nights"' in html and "Add a window" not in html and "Delete</button>" not in html
    assert as_viewer.post("/settings/maintenance-windows", data=_form(name="x")).status_code == 403
    wid = _rows()[0].id
    assert as_viewer.post(f"/settings/maintenance-windows/{wid}/delete").status_code == 403
    assert len(_rows()) == 1


def MaintenanceWindow_add(cast):  # noqa: N802 - reads as what it makes
    from app.updates import maintenance

    maintenance.create("admin", {"name": "nights", "days": [5], "start": "02:00", "end": "04:00", "timezone": "UTC"})


# --- the CLI -------------------------------------------------------------------------------------


def test_the_cli_adds_lists_and_deletes_windows(runner, cast):
    r = runner.invoke(
        args=["windows", "add", "nights", "--days", "sat,sun", "--start", "22:00", "--end", "02:00"]
        + ["--timezone", "America/New_York", "--label", "site=nyc"]
    )
    assert r.exit_code == 0, r.output
    assert "Sat, Sun 22:00-02:00 America/New_York" in r.output
    r = runner.invoke(args=["windows", "list", "--json"])
    assert r.exit_code == 0
    import json

    (w,) = json.loads(r.output)["maintenance_windows"]
    assert w["labels"] == {"site": "nyc"} and w["days"] == [5, 6] and w["created_by"] == "cli"
    r = runner.invoke(args=["windows", "list"])
    assert r.exit_code == 0 and "nights" in r.output and "site=nyc" in r.output
    r = runner.invoke(args=["windows", "add", "bad", "--days", "funday", "--start", "01:00", "--end", "02:00"])
    assert r.exit_code == 2 and "funday" in r.output
    r = runner.invoke(args=["windows", "add", "nights", "--days", "mon", "--start", "01:00", "--end", "02:00"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(args=["windows", "delete", "nights"])
    assert r.exit_code == 0 and _rows() == []
    r = runner.invoke(args=["windows", "delete", "nights"])
    assert r.exit_code == 2 and "no maintenance window" in r.output
    assert audit_actions().count("maintenance_window.created") == 1
    assert audit_actions().count("maintenance_window.deleted") == 1
