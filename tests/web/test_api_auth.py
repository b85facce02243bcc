"""API authentication: session or bearer token; 401 JSON for everyone else; token use audited."""

import pytest

from app.extensions import db
from app.models import ApiToken
from app.timeutil import utcnow
from tests.web.helpers import audit_actions, bearer, error_code


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/hosts"),
        ("get", "/api/version"),
        ("post", "/api/hosts"),
        ("get", "/api/audit"),
        ("delete", "/api/hosts/1"),
        ("post", "/api/hosts/1/update"),
    ],
)
def test_unauthenticated_api_calls_get_401_json(client, cast, method, path):
    r = getattr(client, method)(path)
    assert r.status_code == 401
    assert r.is_json and error_code(r) == "unauthorized"
    assert "Bearer" in r.headers["WWW-Authenticate"]


def test_a_bearer_token_authenticates_api_calls(client, cast, admin_token):
    r = client.get("/api/hosts", headers=bearer(admin_token))
    assert r.status_code == 200
    assert {h["name"] for h in r.get_json()["hosts"]} == {"web-1", "db-1", "app-1"}


def test_a_wrong_or_revoked_token_is_refused(client, cast, admin_token):
    assert client.get("/api/hosts", headers=bearer("rmt_nope")).status_code == 401
    tok = ApiToken.lookup(admin_token)
    tok.revoked_at = utcnow()
    db.session.commit()
    assert client.get("/api/hosts", headers=bearer(admin_token)).status_code == 401


def test_a_bearer_token_does_not_open_the_pages(client, cast, admin_token):
    r = client.get("/hosts", headers=bearer(admin_token))
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_token_use_sets_last_used_at_at_most_once_a_minute(client, cast, admin_token, clock):
    client.get("/api/version", headers=bearer(admin_token))
    db.session.expire_all()
    first = ApiToken.lookup(admin_token).last_used_at
    assert first == clock.now()
    clock.advance(30)
    client.get("/api/version", headers=bearer(admin_token))
    db.session.expire_all()
    assert ApiToken.lookup(admin_token).last_used_at == first
    clock.advance(31)
    client.get("/api/version", headers=bearer(admin_token))
    db.session.expire_all()
    assert ApiToken.lookup(admin_token).last_used_at == clock.now()


def test_token_use_is_audited_once_per_hour_not_per_request(client, cast, admin_token, clock):
    for _ in range(5):
        client.get("/api/version", headers=bearer(admin_token))
        clock.advance(61)
    assert audit_actions().count("auth.token_used") == 1
    clock.advance(3600)
    client.get("/api/version", headers=bearer(admin_token))
    assert audit_actions().count("auth.token_used") == 2


def test_a_viewer_token_reads_but_cannot_mutate(client, cast, viewer_token):
    assert client.get("/api/hosts", headers=bearer(viewer_token)).status_code == 200
    r = client.post("/api/hosts", json={"name": "x"}, headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
