"""Security headers and cookie flags."""

from tests.web.helpers import bearer


def _assert_headers(resp):
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "base-uri 'self'" in csp and "form-action 'self'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "same-origin"
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_pages_carry_the_security_headers(client, auth, cast):
    _assert_headers(client.get("/login"))
    auth.login()
    r = client.get("/hosts")
    _assert_headers(r)
    assert r.headers["Cache-Control"] == "no-store"


def test_api_answers_and_errors_carry_the_security_headers(client, cast, admin_token):
    _assert_headers(client.get("/api/hosts", headers=bearer(admin_token)))
    _assert_headers(client.get("/api/hosts"))
    _assert_headers(client.get("/no-such-page"))


def test_static_files_are_served_with_the_headers_and_htmx_is_vendored(client):
    r = client.get("/static/htmx.min.js")
    assert r.status_code == 200 and b"htmx" in r.data[:200]
    _assert_headers(r)
    r.close()


def test_the_session_cookie_is_httponly_and_samesite_lax(client, auth, cast):
    r = auth.login()
    cookie = next(h for h in r.headers.getlist("Set-Cookie") if h.startswith("session="))
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # only when configured for TLS


def test_pages_use_no_inline_script(client, auth, cast):
    auth.login()
    pages = ("/", "/hosts", f"/hosts/{cast.host_online.id}", "/alerts", "/audit", "/settings/tokens", "/settings/users")
    for path in pages:
        html = client.get(path).get_data(as_text=True)
        assert "<script>" not in html and "onclick=" not in html and "style=" not in html, path
