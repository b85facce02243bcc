"""/login and /logout: credentials, throttling, audit, redirects."""

from app.extensions import db
from app.models import User
from tests.web.helpers import audit_actions


def _user(name):
    db.session.expire_all()
    return db.session.scalar(db.select(User).where(User.username == name))


def test_login_page_renders_a_form(client):
    r = client.get("/login")
    assert r.status_code == 200
    assert b'name="username"' in r.data and b'name="password"' in r.data


def test_it_logs_in_with_the_right_password_and_audits_it(client, auth, cast):
    r = auth.login()
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert client.get("/").status_code == 200
    assert "auth.login" in audit_actions()


def test_it_refuses_a_wrong_password(client, auth, cast):
    r = auth.login("admin", "wrong")
    assert r.status_code == 200
    assert b"Invalid username or password." in r.data
    assert client.get("/").status_code == 302  # still anonymous
    assert _user("admin").failed_logins == 1
    assert audit_actions()[-1] == "auth.login_failed"


def test_an_unknown_username_gets_the_same_answer_as_a_wrong_password(client, auth, cast):
    r = auth.login("nobody", "whatever")
    assert r.status_code == 200
    assert b"Invalid username or password." in r.data


def test_it_locks_the_account_after_the_configured_number_of_failures(client, auth, cast, clock):
    for _ in range(3):  # LOGIN_MAX_FAILURES in the test config
        auth.login("admin", "wrong")
    r = auth.login("admin", "admin-pass-123")  # even the right password is refused now
    assert b"Too many failed attempts" in r.data
    assert client.get("/").status_code == 302
    assert _user("admin").locked_until is not None


def test_a_lockout_ends_after_the_lockout_time(client, auth, cast, clock):
    for _ in range(3):
        auth.login("admin", "wrong")
    clock.advance(61)
    r = auth.login("admin", "admin-pass-123")
    assert r.status_code == 302
    user = _user("admin")
    assert user.failed_logins == 0 and user.locked_until is None


def test_a_success_resets_the_failure_count(client, auth, cast):
    auth.login("admin", "wrong")
    auth.login("admin", "wrong")
    auth.login("admin", "admin-pass-123")
    assert _user("admin").failed_logins == 0


def test_unknown_usernames_are_throttled_per_address(client, auth, cast):
    for i in range(3):
        auth.login(f"ghost{i}", "x")
    r = auth.login("ghost-next", "x")
    assert b"Too many failed attempts" in r.data


def test_an_empty_form_is_a_bad_request(client, cast):
    r = client.post("/login", data={"username": "", "password": ""})
    assert r.status_code == 400


def test_it_follows_a_local_next_but_not_a_foreign_one(client, auth, cast):
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123", "next": "/hosts"})
    assert r.headers["Location"] == "/hosts"
    auth.logout()
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123", "next": "https://evil.example/"})
    assert r.headers["Location"] == "/"
    auth.logout()
    r = client.post("/login", data={"username": "admin", "password": "admin-pass-123", "next": "//evil.example/"})
    assert r.headers["Location"] == "/"


def test_pages_redirect_anonymous_users_to_login(client, cast):
    r = client.get("/hosts")
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=")


def test_logout_ends_the_session_and_audits_it(client, auth, cast):
    auth.login()
    r = auth.logout()
    assert r.status_code == 302
    assert client.get("/").status_code == 302
    assert audit_actions()[-1] == "auth.logout"


def test_logout_refuses_get(client, auth, cast):
    auth.login()
    assert client.get("/logout").status_code == 405
