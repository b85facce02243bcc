"""POST /api/hosts/<id>/update and reading jobs back."""

import pytest

from app.extensions import db
from app.models import AuditEvent, Job
from app.runtime import runtime
from tests.web.helpers import bearer, error_code


def test_it_dispatches_and_answers_202_with_the_job(client, cast, online, release, admin_token):
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=bearer(admin_token))
    assert r.status_code == 202
    job = r.get_json()["job"]
    assert job["status"] == "running" and job["kind"] == "update" and job["host_id"] == cast.host_behind.id
    assert job["target_version"] == "2.0.0" and job["from_version"] == "1.0.0"
    db.session.expire_all()
    assert db.session.get(Job, job["id"]).status == "running"
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "host.update_dispatched"))
    assert ev.details["job_id"] == job["id"]
    assert online["app-1"].types() == ["command.update"]


def test_a_session_user_can_dispatch_with_a_json_body(as_admin, cast, online, release):
    r = as_admin.post(f"/api/hosts/{cast.host_behind.id}/update", json={})
    assert r.status_code == 202


@pytest.mark.parametrize(
    "who,status,code",
    [("offline", 409, "host_offline"), ("current", 409, "already_current"), ("cannot", 422, "agent_cannot_update")],
)
def test_refusals_are_typed_json_errors(client, cast, online, release, admin_token, who, status, code):
    host = {"offline": cast.host_offline, "current": cast.host_online, "cannot": cast.host_behind}[who]
    if who == "cannot":
        host.capabilities = ["heartbeat"]
        db.session.commit()
    r = client.post(f"/api/hosts/{host.id}/update", headers=bearer(admin_token))
    assert r.status_code == status and error_code(r) == code
    assert db.session.scalar(db.select(db.func.count(Job.id))) == 0


def test_a_second_dispatch_is_409_update_in_progress(client, cast, online, release, admin_token):
    url = f"/api/hosts/{cast.host_behind.id}/update"
    assert client.post(url, headers=bearer(admin_token)).status_code == 202
    r = client.post(url, headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "update_in_progress"


def test_a_second_request_while_the_agent_restarts_is_update_in_progress_not_host_offline(
    client, cast, online, release, admin_token
):
    url = f"/api/hosts/{cast.host_behind.id}/update"
    assert client.post(url, headers=bearer(admin_token)).status_code == 202
    # The agent restarts into the new version: its socket is gone and the host reads offline.
    runtime().connections.unregister(online["app-1"].conn)
    cast.host_behind.connected = False
    db.session.commit()
    r = client.post(url, headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "update_in_progress"
    assert db.session.scalar(db.select(db.func.count(Job.id))) == 1


def test_a_revoked_host_is_refused_as_revoked(client, cast, online, release, admin_token):
    client.post(f"/api/hosts/{cast.host_behind.id}/revoke", headers=bearer(admin_token))
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "host_revoked"
    assert "revoked" in r.get_json()["error"]["message"]


def test_an_unknown_host_is_404_in_the_same_words_as_every_host_route(client, cast, release, admin_token):
    r = client.post("/api/hosts/9999/update", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "host_not_found"
    assert r.get_json()["error"]["message"] == "no host with id 9999"
    others = (("GET", "/api/hosts/9999"), ("POST", "/api/hosts/9999/token"), ("GET", "/api/hosts/9999/jobs"))
    for method, path in others:
        other = client.open(path, method=method, headers=bearer(admin_token))
        assert other.status_code == 404 and other.get_json() == r.get_json(), path


def test_viewers_get_403(client, cast, online, release, viewer_token):
    r = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert online["app-1"].sent == []


def test_a_malformed_body_is_400(client, cast, online, release, admin_token):
    r = client.post(
        f"/api/hosts/{cast.host_behind.id}/update",
        data="{",
        content_type="application/json",
        headers=bearer(admin_token),
    )
    assert r.status_code == 400 and error_code(r) == "invalid_json"


def test_get_is_not_allowed(client, cast, admin_token):
    r = client.get(f"/api/hosts/{cast.host_behind.id}/update", headers=bearer(admin_token))
    assert r.status_code == 405


def test_jobs_read_back_by_host_and_by_id(client, cast, online, release, admin_token, viewer_token):
    job = client.post(f"/api/hosts/{cast.host_behind.id}/update", headers=bearer(admin_token)).get_json()["job"]
    jobs = client.get(f"/api/hosts/{cast.host_behind.id}/jobs", headers=bearer(viewer_token)).get_json()["jobs"]
    assert [j["id"] for j in jobs] == [job["id"]]
    got = client.get(f"/api/jobs/{job['id']}", headers=bearer(viewer_token)).get_json()["job"]
    for key in ("id", "host_id", "kind", "status", "phase", "error", "created_at", "updated_at", "finished_at"):
        assert key in got
    host = client.get(f"/api/hosts/{cast.host_behind.id}", headers=bearer(viewer_token)).get_json()
    assert host["latest_update_job"]["id"] == job["id"]


def test_an_unknown_job_is_404_job_not_found(client, cast, admin_token):
    r = client.get("/api/jobs/no-such-job", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "job_not_found"
