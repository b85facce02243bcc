"""/login and /logout: credentials, throttling, audit, redirects."""

import re

from app.extensions import db
from app.models import LoginThrottle
from tests.web.helpers import audit_actions


def _throttle(key):
    db.session.expire_all()
    return db.session.get(LoginThrottle, key)


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
    assert _throttle("name:admin").failures == 1
    assert _throttle("addr:127.0.0.1").failures == 1
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
    assert _throttle("name:admin").locked_until is not None


def test_a_lockout_ends_after_the_lockout_time(client, auth, cast, clock):
    for _ in range(3):
        auth.login("admin", "wrong")
    clock.advance(61)
    r = auth.login("admin", "admin-pass-123")
    assert r.status_code == 302
    assert _throttle("name:admin") is None


def test_a_success_resets_the_failure_count(client, auth, cast):
    auth.login("admin", "wrong")
    auth.login("admin", "wrong")
    auth.login("admin", "admin-pass-123")
    assert _throttle("name:admin") is None
    # The address keeps its count (a success with one account must not reset a spray from it).
    assert _throttle("addr:127.0.0.1").failures == 2


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


# --- item 8 of issue 9: the lock-out must not tell which names exist ---------------------------


def _login_from(client, addr, username, password):
    r = client.post("/login", data={"username": username, "password": password}, environ_base={"REMOTE_ADDR": addr})
    return r.status_code, _message(r)


def _message(r):
    """The error line the login page shows (None when it shows none)."""
    m = re.search(r'role="alert">([^<]*)<', r.get_data(as_text=True))
    return m.group(1) if m else None


def _enumeration_run(client, candidate):
    """The attack of the issue: five failures on a candidate, then probes from the same and another address."""
    out = []
    for _ in range(5):
        out.append(_login_from(client, "10.0.0.1", candidate, "wrong-guess"))
    out.append(_login_from(client, "10.0.0.1", "surely-unknown", "wrong-guess"))
    out.append(_login_from(client, "10.0.0.2", "surely-unknown", "wrong-guess"))
    out.append(_login_from(client, "10.0.0.2", candidate, "wrong-guess"))
    return out


def test_known_and_unknown_candidates_get_identical_answers(app, client, cast, clock):
    app.config["LOGIN_MAX_FAILURES"] = 5
    known = _enumeration_run(client, "admin")
    clock.advance(3600)  # every lock-out over; the failure counts start again after a lock
    db.session.execute(db.delete(LoginThrottle))
    db.session.commit()
    unknown = _enumeration_run(client, "no-such-user")
    assert known == unknown
    # and the run means something: the first four are "Invalid", then locked for address and name
    assert [m for _, m in known[:4]] == ["Invalid username or password."] * 4
    assert known[4][1].startswith("Too many failed attempts")  # the fifth locks
    assert known[5][1].startswith("Too many failed attempts")  # same address, another name
    assert known[6][1] == "Invalid username or password."  # another address, another name
    assert known[7][1].startswith("Too many failed attempts")  # another address, the locked name


def test_an_unknown_name_is_locked_per_name_like_a_known_one(client, cast):
    for i in range(3):
        _login_from(client, f"10.0.1.{i}", "ghost", "x")  # three addresses, one name
    assert _login_from(client, "10.0.1.9", "ghost", "x")[1].startswith("Too many")
    for i in range(3):
        _login_from(client, f"10.0.2.{i}", "admin", "x")
    assert _login_from(client, "10.0.2.9", "admin", "admin-pass-123")[1].startswith("Too many")


def test_a_known_name_is_locked_per_address_like_an_unknown_one(client, cast):
    for i in range(3):
        _login_from(client, "10.0.3.1", f"ghost{i}", "x")
    status, message = _login_from(client, "10.0.3.1", "admin", "admin-pass-123")
    assert status == 200 and message.startswith("Too many")
    assert _login_from(client, "10.0.3.2", "admin", "admin-pass-123")[0] == 302


def test_an_unknown_name_costs_the_same_password_hash_as_a_known_one(app, client, cast, monkeypatch):
    """Timing: both paths run exactly one hash check with the same method and parameters (scrypt
    in production, the test configuration's cheap method here: the dummy hash follows the config)."""
    import werkzeug.security

    from app.auth import throttle

    calls = []
    real = werkzeug.security.check_password_hash

    def counting(pwhash, password):
        calls.append(pwhash.split("$")[0])
        return real(pwhash, password)

    monkeypatch.setattr(throttle, "check_password_hash", counting)
    monkeypatch.setattr("app.models.check_password_hash", counting)
    _login_from(client, "10.0.4.1", "admin", "wrong")
    _login_from(client, "10.0.4.2", "nobody", "wrong")
    assert len(calls) == 2 and calls[0] == calls[1], calls


def test_old_failures_are_forgotten_and_the_table_is_pruned(client, cast, clock):
    from app.auth.throttle import FAILURE_MEMORY_S

    _login_from(client, "10.0.5.1", "ghost-a", "x")
    _login_from(client, "10.0.5.1", "ghost-a", "x")
    clock.advance(FAILURE_MEMORY_S + 1)
    _login_from(client, "10.0.5.2", "ghost-b", "x")  # prunes what is older than the memory
    assert _throttle("name:ghost-a") is None and _throttle("addr:10.0.5.1") is None
    assert _throttle("name:ghost-b").failures == 1
