"""POST /hosts/<id>/revoke and POST /hosts/<id>/delete."""

from agent.protocol import CLOSE_REVOKED
from app.extensions import db
from app.models import Host, Job
from app.runtime import runtime
from tests.web.helpers import HX, audit_actions


def _host(host_id):
    db.session.expire_all()
    return db.session.get(Host, host_id)


def test_revoke_clears_the_token_closes_the_socket_and_audits(as_admin, cast, online, app):
    host_id, token = cast.host_online.id, cast.host_online_token
    r = as_admin.post(f"/hosts/{host_id}/revoke")
    assert r.status_code == 303 and r.headers["Location"] == f"/hosts/{host_id}"
    host = _host(host_id)
    assert host.revoked_at is not None and host.token_hash is None and not host.connected
    assert Host.by_token(token) is None
    assert online["web-1"].closed[0] == CLOSE_REVOKED
    assert runtime(app).connections.get(host_id) is None
    assert audit_actions()[-1] == "host.revoked"


def test_revoke_over_htmx_redirects_the_page(as_admin, cast, online):
    r = as_admin.post(f"/hosts/{cast.host_online.id}/revoke", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == f"/hosts/{cast.host_online.id}"
    assert _host(cast.host_online.id).revoked_at is not None


def test_revoke_twice_audits_once(as_admin, cast):
    as_admin.post(f"/hosts/{cast.host_offline.id}/revoke")
    as_admin.post(f"/hosts/{cast.host_offline.id}/revoke")
    assert audit_actions().count("host.revoked") == 1


def test_revoke_refuses_viewers_unknown_hosts_and_get(as_viewer, cast, online):
    assert as_viewer.post(f"/hosts/{cast.host_online.id}/revoke").status_code == 403
    assert as_viewer.post(f"/hosts/{cast.host_online.id}/revoke", headers=HX).status_code == 403
    assert _host(cast.host_online.id).revoked_at is None
    assert online["web-1"].closed is None
    assert as_viewer.get(f"/hosts/{cast.host_online.id}/revoke").status_code == 405


def test_revoke_of_an_unknown_host_is_404(as_admin):
    assert as_admin.post("/hosts/9999/revoke").status_code == 404


def test_delete_removes_the_host_keeps_its_job_history_closes_the_socket_and_audits(as_admin, cast, online):
    host_id = cast.host_online.id
    job = Job(host_id=host_id, host_name="web-1", kind="update", status="failed", params={})
    db.session.add(job)
    db.session.commit()
    job_id = job.id
    r = as_admin.post(f"/hosts/{host_id}/delete")
    assert r.status_code == 303 and r.headers["Location"] == "/hosts"
    assert _host(host_id) is None
    db.session.rollback()
    kept = db.session.get(Job, job_id)
    assert (kept.host_id, kept.host_name, kept.status) == (None, "web-1", "failed")
    assert online["web-1"].closed[0] == CLOSE_REVOKED
    assert audit_actions()[-1] == "host.deleted"
    assert b"Host web-1 deleted." in as_admin.get("/hosts").data


def test_delete_over_htmx_redirects_to_the_hosts_list(as_admin, cast):
    r = as_admin.post(f"/hosts/{cast.host_offline.id}/delete", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/hosts"
    assert _host(cast.host_offline.id) is None


def test_delete_refuses_viewers_unknown_hosts_and_get(as_viewer, cast):
    assert as_viewer.post(f"/hosts/{cast.host_offline.id}/delete").status_code == 403
    assert _host(cast.host_offline.id) is not None
    assert as_viewer.post("/hosts/9999/delete").status_code == 403  # role is checked before existence
    assert as_viewer.get(f"/hosts/{cast.host_offline.id}/delete").status_code == 405


def test_delete_of_an_unknown_host_is_404(as_admin):
    assert as_admin.post("/hosts/9999/delete").status_code == 404
