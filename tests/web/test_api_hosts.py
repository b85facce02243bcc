"""/api/hosts: list, create (enrol), read, delete, revoke, ping."""

import pytest

from agent.protocol import CLOSE_REVOKED
from app.extensions import db
from app.models import AuditEvent, Host
from tests.web.helpers import audit_actions, bearer, error_code


@pytest.fixture
def api(client, admin_token):
    """Call the API as the admin, with a bearer token."""

    class Api:
        def __getattr__(self, method):
            def call(path, **kw):
                kw.setdefault("headers", {}).update(bearer(admin_token))
                return getattr(client, method)(path, **kw)

            return call

    return Api()


def _host(host_id):
    db.session.expire_all()
    return db.session.get(Host, host_id)


# --- GET /api/hosts ---------------------------------------------------------------------------


def test_it_lists_hosts_with_the_documented_fields(api, cast):
    hosts = api.get("/api/hosts").get_json()["hosts"]
    assert [h["name"] for h in hosts] == ["app-1", "db-1", "web-1"]
    for key in ("id", "name", "online", "last_seen", "agent_version", "os", "arch", "capabilities", "version_state"):
        assert key in hosts[0]
    assert {h["name"]: h["version_state"] for h in hosts} == {"app-1": "behind", "db-1": "current", "web-1": "current"}


def test_it_filters_behind_hosts(api, cast):
    assert [h["name"] for h in api.get("/api/hosts?updates=behind").get_json()["hosts"]] == ["app-1"]
    r = api.get("/api/hosts?updates=nope")
    assert r.status_code == 400 and error_code(r) == "invalid_parameter"


# --- POST /api/hosts --------------------------------------------------------------------------


def test_it_enrols_a_host_and_returns_the_token_once(api, cast):
    r = api.post("/api/hosts", json={"name": "mail-1"})
    assert r.status_code == 201
    body = r.get_json()
    assert body["host"]["name"] == "mail-1" and body["host"]["online"] is False
    assert body["token"].startswith("rma_")
    assert body["install_command"].endswith(f"--token {body['token']}")
    assert Host.by_token(body["token"]).id == body["host"]["id"]
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "host.enrolled"))
    assert ev.target == "mail-1" and ev.details["host_id"] == body["host"]["id"]
    assert "token" not in api.get(f"/api/hosts/{body['host']['id']}").get_json()


@pytest.mark.parametrize("name", ["", "a b", "x" * 129, "semi;colon", 42, None, "ünïcode"])
def test_it_rejects_invalid_names(api, cast, name):
    r = api.post("/api/hosts", json={"name": name})
    assert r.status_code == 400 and error_code(r) == "invalid_name"


def test_it_accepts_names_with_dots_dashes_and_underscores(api, cast):
    assert api.post("/api/hosts", json={"name": "db_2.example-org"}).status_code == 201
    assert api.post("/api/hosts", json={"name": "x" * 128}).status_code == 201


def test_it_refuses_a_duplicate_name(api, cast):
    r = api.post("/api/hosts", json={"name": "web-1"})
    assert r.status_code == 409 and error_code(r) == "host_exists"
    assert db.session.scalar(db.select(db.func.count(Host.id))) == 3


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '"name"'])
def test_it_rejects_bad_json(api, cast, body):
    r = api.post("/api/hosts", data=body, content_type="application/json")
    assert r.status_code == 400 and error_code(r) == "invalid_json"


def test_viewers_cannot_enrol(as_viewer, cast):
    r = as_viewer.post("/api/hosts", json={"name": "x"})
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert db.session.scalar(db.select(Host).where(Host.name == "x")) is None


def test_enrol_refuses_other_methods(api):
    r = api.put("/api/hosts", json={"name": "x"})
    assert r.status_code == 405 and error_code(r) == "method_not_allowed"


# --- GET /api/hosts/<id> ----------------------------------------------------------------------


def test_it_reads_one_host(api, cast):
    body = api.get(f"/api/hosts/{cast.host_behind.id}").get_json()
    assert body["host"]["name"] == "app-1" and body["host"]["version_state"] == "behind"
    assert body["latest_update_job"] is None


def test_an_unknown_host_is_404_host_not_found(api):
    for method, path in [
        ("get", "/api/hosts/9999"),
        ("delete", "/api/hosts/9999"),
        ("post", "/api/hosts/9999/revoke"),
        ("post", "/api/hosts/9999/ping"),
        ("get", "/api/hosts/9999/jobs"),
    ]:
        r = getattr(api, method)(path)
        assert r.status_code == 404 and error_code(r) == "host_not_found", path


# --- DELETE /api/hosts/<id> -------------------------------------------------------------------


def test_delete_removes_the_host_closes_its_socket_and_audits(api, cast, online):
    r = api.delete(f"/api/hosts/{cast.host_online.id}")
    assert r.status_code == 204
    assert _host(cast.host_online.id) is None
    assert online["web-1"].closed[0] == CLOSE_REVOKED
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "host.deleted"))
    assert ev.target == "web-1" and ev.actor.startswith("admin (token rmt_")


def test_viewers_cannot_delete(client, cast, viewer_token):
    r = client.delete(f"/api/hosts/{cast.host_online.id}", headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert _host(cast.host_online.id) is not None


# --- POST /api/hosts/<id>/revoke --------------------------------------------------------------


def test_revoke_clears_the_token_and_closes_the_socket(api, cast, online):
    r = api.post(f"/api/hosts/{cast.host_online.id}/revoke")
    assert r.status_code == 200
    assert r.get_json()["host"]["revoked"] is True and r.get_json()["host"]["online"] is False
    assert Host.by_token(cast.host_online_token) is None
    assert online["web-1"].closed == (CLOSE_REVOKED, "token revoked")
    assert "host.revoked" in audit_actions()


def test_viewers_cannot_revoke(client, cast, viewer_token, online):
    r = client.post(f"/api/hosts/{cast.host_online.id}/revoke", headers=bearer(viewer_token))
    assert r.status_code == 403
    assert online["web-1"].closed is None and _host(cast.host_online.id).revoked_at is None


def test_revoke_refuses_get(api, cast):
    assert api.get(f"/api/hosts/{cast.host_online.id}/revoke").status_code == 405


# --- POST /api/hosts/<id>/ping ----------------------------------------------------------------


def test_ping_reports_the_round_trip(api, cast, online):
    r = api.post(f"/api/hosts/{cast.host_online.id}/ping")
    assert r.status_code == 200
    assert isinstance(r.get_json()["rtt_ms"], float)
    assert online["web-1"].types() == ["ping"]


def test_ping_of_an_offline_host_is_409(api, cast):
    r = api.post(f"/api/hosts/{cast.host_offline.id}/ping")
    assert r.status_code == 409 and error_code(r) == "host_offline"


def test_ping_without_an_answer_is_504(api, cast, connect, app):
    app.config["PING_TIMEOUT"] = 0.05
    connect(cast.host_online, answer_pings=False)
    r = api.post(f"/api/hosts/{cast.host_online.id}/ping")
    assert r.status_code == 504 and error_code(r) == "agent_timeout"


def test_viewers_cannot_ping(client, cast, viewer_token, online):
    assert client.post(f"/api/hosts/{cast.host_online.id}/ping", headers=bearer(viewer_token)).status_code == 403
    assert online["web-1"].sent == []
