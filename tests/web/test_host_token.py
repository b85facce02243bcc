"""POST /hosts/<id>/token and POST /api/hosts/<id>/token: issue a new agent token."""

from agent.protocol import CLOSE_REVOKED
from app.extensions import db
from app.models import AuditEvent, Host
from tests.web.helpers import HX, audit_actions, bearer, error_code


def _host(host_id):
    db.session.expire_all()
    return db.session.get(Host, host_id)


def test_a_new_token_replaces_the_old_one_and_is_shown_once_with_the_install_command(as_admin, cast, online):
    host_id, old = cast.host_online.id, cast.host_online_token
    r = as_admin.post(f"/hosts/{host_id}/token")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    host = _host(host_id)
    assert Host.by_token(old) is None  # the old token stops working at once
    new = html.split('<pre class="copy" id="agent-token">')[1].split("</pre>")[0]
    assert Host.by_token(new).id == host_id and host.token_prefix == new[:12]
    assert f"--token {new}" in html and "New agent token for web-1" in html
    assert online["web-1"].closed[0] == CLOSE_REVOKED  # the connection made with the old token
    assert r.headers["Cache-Control"] == "no-store"
    assert new not in as_admin.get(f"/hosts/{host_id}").get_data(as_text=True)  # shown once


def test_a_new_token_lifts_a_revocation_and_is_audited(as_admin, cast):
    host_id = cast.host_offline.id
    as_admin.post(f"/hosts/{host_id}/revoke")
    assert _host(host_id).revoked_at is not None
    r = as_admin.post(f"/hosts/{host_id}/token", headers=HX)  # htmx swaps the same page into the body
    assert r.status_code == 200 and 'id="agent-token"' in r.get_data(as_text=True)
    host = _host(host_id)
    assert host.revoked_at is None and host.token_hash is not None
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "host.token_reissued"))
    assert ev.actor == "admin" and ev.target == "db-1"
    assert ev.details == {"host_id": host_id, "prefix": host.token_prefix, "was_revoked": True}
    assert audit_actions()[-2:] == ["host.revoked", "host.token_reissued"]


def test_viewers_unknown_hosts_and_get_are_refused(as_viewer, cast):
    before = _host(cast.host_online.id).token_hash
    assert as_viewer.post(f"/hosts/{cast.host_online.id}/token").status_code == 403
    assert as_viewer.post(f"/hosts/{cast.host_online.id}/token", headers=HX).status_code == 403
    assert _host(cast.host_online.id).token_hash == before
    assert as_viewer.get(f"/hosts/{cast.host_online.id}/token").status_code == 405
    assert "host.token_reissued" not in audit_actions()


def test_an_unknown_host_is_404(as_admin, cast):
    r = as_admin.post("/hosts/9999/token")
    assert r.status_code == 404 and "no host with id 9999" in r.get_data(as_text=True)


def test_the_host_page_offers_the_button_to_admins_only(client, auth, cast):
    auth.login("admin", "admin-pass-123")
    assert 'id="token-button"' in client.get(f"/hosts/{cast.host_online.id}").get_data(as_text=True)
    auth.logout()
    auth.login("viewer", "viewer-pass-123")
    assert 'id="token-button"' not in client.get(f"/hosts/{cast.host_online.id}").get_data(as_text=True)


# --- API ---------------------------------------------------------------------------------------


def test_the_api_answers_the_new_token_and_install_command(client, cast, online, admin_token):
    host_id = cast.host_online.id
    r = client.post(f"/api/hosts/{host_id}/token", headers=bearer(admin_token))
    assert r.status_code == 200
    body = r.get_json()
    assert body["host"]["id"] == host_id and body["host"]["revoked"] is False
    assert body["token"].startswith("rma_") and f"--token {body['token']}" in body["install_command"]
    assert Host.by_token(body["token"]).id == host_id and Host.by_token(cast.host_online_token) is None
    assert audit_actions()[-1] == "host.token_reissued"


def test_the_api_refuses_viewers_and_unknown_hosts(client, cast, viewer_token, admin_token):
    r = client.post(f"/api/hosts/{cast.host_online.id}/token", headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert Host.by_token(cast.host_online_token) is not None
    r = client.post("/api/hosts/9999/token", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "host_not_found"
