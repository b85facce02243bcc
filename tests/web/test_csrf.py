"""CSRF: forms carry a token; cookie-session API mutations need the header or a JSON body."""

import re

import pytest

from tests.web.helpers import bearer, error_code


@pytest.fixture
def app_config(app_config):
    return {**app_config, "WTF_CSRF_ENABLED": True}


def _form_token(client, path="/login"):
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def _meta_token(client, path="/"):
    html = client.get(path).get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def _login(client):
    token = _form_token(client)
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123", "csrf_token": token})
    assert r.status_code == 302


def test_the_login_form_without_a_csrf_token_is_refused(client, cast):
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123"})
    assert r.status_code == 400
    assert client.get("/").status_code == 302


def test_the_login_form_with_a_forged_csrf_token_is_refused(client, cast):
    client.get("/login")
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123", "csrf_token": "forged.token"})
    assert r.status_code == 400


def test_the_login_form_with_its_csrf_token_works(client, cast):
    _login(client)
    assert client.get("/").status_code == 200


def test_a_page_post_without_a_token_is_refused(client, cast):
    _login(client)
    r = client.post(f"/hosts/{cast.host_online.id}/revoke")
    assert r.status_code == 400


def test_the_htmx_header_token_is_accepted_on_page_posts(client, cast):
    _login(client)
    token = _meta_token(client)
    r = client.post(f"/hosts/{cast.host_online.id}/revoke", headers={"X-CSRFToken": token, "HX-Request": "true"})
    assert r.status_code == 204


def test_a_cookie_session_api_mutation_needs_the_header_or_json(client, cast):
    _login(client)
    r = client.post("/api/hosts", data="name=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and error_code(r) == "csrf_required"
    r = client.delete(f"/api/hosts/{cast.host_offline.id}")
    assert r.status_code == 400 and error_code(r) == "csrf_required"


def test_a_forged_csrf_header_on_the_api_is_refused(client, cast):
    _login(client)
    r = client.delete(f"/api/hosts/{cast.host_offline.id}", headers={"X-CSRFToken": "forged"})
    assert r.status_code == 400 and error_code(r) == "csrf_failed"


def test_a_cookie_session_api_mutation_with_the_header_works(client, cast):
    _login(client)
    token = _meta_token(client)
    r = client.delete(f"/api/hosts/{cast.host_offline.id}", headers={"X-CSRFToken": token})
    assert r.status_code == 204


def test_a_cookie_session_api_mutation_with_a_json_body_works(client, cast):
    _login(client)
    r = client.post("/api/hosts", json={"name": "new-host"})
    assert r.status_code == 201


def test_bearer_token_calls_need_no_csrf_token(client, cast, admin_token):
    r = client.delete(f"/api/hosts/{cast.host_offline.id}", headers=bearer(admin_token))
    assert r.status_code == 204
