"""POST /hosts/<id>/update: the Update agent button (HTMX and plain form)."""

import pytest

from app.extensions import db
from app.models import Host, Job
from tests.web.helpers import HX, audit_actions


def _jobs(host_id):
    db.session.expire_all()
    return db.session.scalars(db.select(Job).where(Job.host_id == host_id)).all()


def test_the_htmx_button_dispatches_and_answers_the_polling_panel_with_the_message(as_admin, cast, online, release):
    host_id = cast.host_behind.id
    r = as_admin.post(f"/hosts/{host_id}/update", headers=HX)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "<html" not in html and 'id="update-status"' in html and 'hx-trigger="every 1s"' in html
    assert "Update of app-1 to 2.0.0 dispatched." in html
    assert 'id="host-status" hx-swap-oob="true"' in html  # the rest of the page follows the panel
    [job] = _jobs(host_id)
    assert job.status == "running" and job.target_version == "2.0.0" and job.actor == "admin"
    assert "host.update_dispatched" in audit_actions()
    assert online["app-1"].types() == ["command.update"]
    assert online["app-1"].sent[0]["data"]["job_id"] == job.id
    # The next poll replaces the panel: the banner does not outlive the moment (nor the job).
    poll = as_admin.get(f"/hosts/{host_id}/update-status", headers=HX).get_data(as_text=True)
    assert "dispatched." not in poll and 'data-job-status="running"' in poll
    assert "dispatched." not in as_admin.get(f"/hosts/{host_id}").get_data(as_text=True)


def test_a_plain_form_post_dispatches_and_answers_303(as_admin, cast, online, release):
    host_id = cast.host_behind.id
    r = as_admin.post(f"/hosts/{host_id}/update")
    assert r.status_code == 303 and r.headers["Location"] == f"/hosts/{host_id}"
    assert len(_jobs(host_id)) == 1
    html = as_admin.get(f"/hosts/{host_id}").get_data(as_text=True)
    assert "dispatched" in html and 'hx-trigger="every 1s"' in html


def test_while_an_update_runs_the_button_waits_without_calling_it_a_refusal(as_admin, cast, online, release):
    host_id = cast.host_behind.id
    as_admin.post(f"/hosts/{host_id}/update")
    html = as_admin.get(f"/hosts/{host_id}").get_data(as_text=True)
    assert 'id="update-button" disabled' in html and "Updating…" in html
    assert "already running" not in html and 'id="update-refusal"' not in html


def test_a_revoked_hosts_panel_says_revoked_not_offline(as_admin, cast, online, release):
    host_id = cast.host_behind.id
    as_admin.post(f"/hosts/{host_id}/revoke")
    html = as_admin.get(f"/hosts/{host_id}").get_data(as_text=True)
    panel = html[html.index('id="update-status"') : html.index("</section>", html.index('id="update-status"'))]
    assert "revoked" in panel and "offline" not in panel
    assert 'id="token-button"' in html  # and the page offers the way back


@pytest.mark.parametrize(
    "who,status,message",
    [
        ("offline", 409, "is offline"),
        ("current", 409, "already runs"),
        ("cannot", 422, "does not announce the &#39;update&#39; capability"),
    ],
)
def test_refusals_come_back_as_the_partial_with_the_status(
    as_admin, cast, online, release, connect, who, status, message
):
    host = {"offline": cast.host_offline, "current": cast.host_online, "cannot": cast.host_behind}[who]
    if who == "cannot":
        host.capabilities = []
        db.session.commit()
    r = as_admin.post(f"/hosts/{host.id}/update", headers=HX)
    assert r.status_code == status
    html = r.get_data(as_text=True)
    assert 'id="update-status"' in html and "<html" not in html
    assert message in html
    assert _jobs(host.id) == []


def test_a_second_click_while_running_is_refused_as_update_in_progress(as_admin, cast, online, release):
    host_id = cast.host_behind.id
    as_admin.post(f"/hosts/{host_id}/update", headers=HX)
    r = as_admin.post(f"/hosts/{host_id}/update", headers=HX)
    assert r.status_code == 409 and b"already running" in r.data
    assert len(_jobs(host_id)) == 1


def test_a_plain_form_refusal_flashes_and_redirects(as_admin, cast, release):
    r = as_admin.post(f"/hosts/{cast.host_offline.id}/update")
    assert r.status_code == 303
    html = as_admin.get(r.headers["Location"]).get_data(as_text=True)
    assert "flash-error" in html and "is offline" in html


def test_viewers_get_403(as_viewer, cast, online, release):
    r = as_viewer.post(f"/hosts/{cast.host_behind.id}/update", headers=HX)
    assert r.status_code == 403
    assert _jobs(cast.host_behind.id) == []


def test_an_unknown_host_is_404(as_admin, release):
    for headers in ({}, HX):
        r = as_admin.post("/hosts/9999/update", headers=headers)
        assert r.status_code == 404 and "no host with id 9999" in r.get_data(as_text=True)


def test_get_is_not_allowed(as_admin, cast):
    assert as_admin.get(f"/hosts/{cast.host_behind.id}/update").status_code == 405


def test_anonymous_htmx_posts_are_sent_to_login(client, cast):
    r = client.post(f"/hosts/{cast.host_behind.id}/update", headers=HX)
    assert r.status_code == 401 and r.headers["HX-Redirect"].startswith("/login")
    assert db.session.get(Host, cast.host_behind.id) is not None
