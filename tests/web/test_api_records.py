"""/api/version, /api/alerts, /api/audit, /api/tokens."""

from app.extensions import db
from app.models import Alert, ApiToken, AuditEvent
from tests.conftest import SERVER_VERSION
from tests.web.helpers import bearer, error_code


def test_version_reports_the_server_version(client, cast, viewer_token):
    assert client.get("/api/version", headers=bearer(viewer_token)).get_json() == {"version": SERVER_VERSION}


def test_alerts_filter_by_status(client, cast, viewer_token):
    Alert.raise_or_touch("update_failed", "1", "one", cast.host_online.id)
    Alert.raise_or_touch("update_failed", "3", "three", cast.host_behind.id)
    db.session.commit()
    Alert.resolve("update_failed", "3")
    db.session.commit()

    def messages(q):
        r = client.get(f"/api/alerts{q}", headers=bearer(viewer_token))
        return sorted(a["message"] for a in r.get_json()["alerts"])

    assert messages("") == ["one"]
    assert messages("?status=open") == ["one"]
    assert messages("?status=resolved") == ["three"]
    assert messages("?status=all") == ["one", "three"]
    r = client.get("/api/alerts?status=maybe", headers=bearer(viewer_token))
    assert r.status_code == 400 and error_code(r) == "invalid_parameter"


def test_audit_is_newest_first_with_limit_and_before_id(client, cast, viewer_token):
    client.get("/api/version", headers=bearer(viewer_token))  # the token's first use is audited; get it done
    for i in range(5):
        AuditEvent.record("tester", "test.event", f"t{i}")
    db.session.commit()
    body = client.get("/api/audit?limit=2", headers=bearer(viewer_token)).get_json()
    assert [e["target"] for e in body["events"]] == ["t4", "t3"]
    body = client.get(f"/api/audit?limit=2&before_id={body['next_before_id']}", headers=bearer(viewer_token)).get_json()
    assert [e["target"] for e in body["events"]] == ["t2", "t1"]


def test_audit_rejects_bad_parameters(client, cast, viewer_token):
    for q in ("limit=0", "limit=abc", "limit=100000", "before_id=-1"):
        r = client.get(f"/api/audit?{q}", headers=bearer(viewer_token))
        assert r.status_code == 400 and error_code(r) == "invalid_parameter", q


def test_an_admin_creates_an_api_token_for_themself(as_admin, cast):
    r = as_admin.post("/api/tokens", json={"name": "ci"})
    assert r.status_code == 201
    body = r.get_json()
    assert body["token"].startswith("rmt_") and body["api_token"]["prefix"] == body["token"][:12]
    tok = ApiToken.lookup(body["token"])
    assert tok.user_id == cast.admin.id and tok.name == "ci"
    assert db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "token.created")) is not None
    assert as_admin.get("/api/hosts", headers=bearer(body["token"])).status_code == 200


def test_token_creation_refuses_viewers_bad_names_and_get(app, as_viewer, cast, admin_token):
    assert as_viewer.post("/api/tokens", json={}).status_code == 403
    client = app.test_client()  # no viewer session cookie: the bearer token decides
    r = client.post("/api/tokens", json={"name": 5}, headers=bearer(admin_token))
    assert r.status_code == 400 and error_code(r) == "invalid_name"
    assert client.get("/api/tokens", headers=bearer(admin_token)).status_code == 405
