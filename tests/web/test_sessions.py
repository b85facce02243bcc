"""Sessions end on the server side: a copied cookie dies with a logout, a new password or role, a disable.

Over real HTTP against the real server (waitress), with ``requests`` sessions standing in for two
browsers, so the cookie really is copied from one to the other.
"""

from __future__ import annotations

import re

import pytest
import requests
import sqlalchemy as sa

from app.extensions import db
from app.models import ApiToken, User
from tests.support.live import LiveServer

pytestmark = pytest.mark.timeout(60)

_FORM_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')
_META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


@pytest.fixture
def live(app, cast):
    app.config["WTF_CSRF_ENABLED"] = True  # as in production: the copied cookie carries the CSRF secret too
    with LiveServer(app) as server:
        yield server


class Browser:
    def __init__(self, base: str):
        self.base = base
        self.http = requests.Session()

    def login(self, username="admin", password="admin-pass-123") -> Browser:
        token = _FORM_CSRF.search(self.http.get(self.base + "/login", timeout=10).text).group(1)
        r = self.http.post(
            self.base + "/login",
            data={"username": username, "password": password, "csrf_token": token},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 302 and r.headers["Location"] == "/", r.text[:300]
        return self

    def copy(self) -> Browser:
        """Another browser holding a copy of this one's cookies (what a thief would have)."""
        other = Browser(self.base)
        other.http.cookies.update(self.http.cookies)
        return other

    def csrf(self) -> str:
        return _META_CSRF.search(self.http.get(self.base + "/", timeout=10).text).group(1)

    def page(self, path="/") -> int:
        return self.http.get(self.base + path, allow_redirects=False, timeout=10).status_code

    def api(self, path="/api/version") -> int:
        return self.http.get(self.base + path, timeout=10).status_code

    def mint_token(self, csrf: str) -> requests.Response:
        return self.http.post(
            self.base + "/api/tokens", json={"name": "minted"}, headers={"X-CSRFToken": csrf}, timeout=10
        )

    def logout(self) -> int:
        csrf = self.csrf()
        return self.http.post(
            self.base + "/logout", data={"csrf_token": csrf}, allow_redirects=False, timeout=10
        ).status_code


def _minted() -> int:
    db.session.remove()
    return db.session.scalar(sa.select(sa.func.count(ApiToken.id)).where(ApiToken.name == "minted"))


def _change(username: str, change) -> None:
    """Change a user in the database as the CLI or another admin would (another session, committed)."""
    db.session.remove()
    user = db.session.scalar(sa.select(User).where(User.username == username))
    change(user)
    db.session.commit()


def test_a_cookie_copied_before_logout_is_dead_after_it(live):
    browser = Browser(live.admin_url).login()
    thief = browser.copy()
    csrf = browser.csrf()
    assert thief.page() == 200 and thief.api() == 200  # the copy works while the session lives

    assert browser.logout() == 302
    assert thief.page() == 302  # to the login page
    assert thief.api() == 401
    assert thief.mint_token(csrf).status_code == 401
    assert _minted() == 0


def test_logout_in_one_browser_ends_the_other_browsers_too(live):
    laptop = Browser(live.admin_url).login()
    phone = Browser(live.admin_url).login()
    assert phone.page() == 200
    laptop.logout()
    assert phone.page() == 302 and phone.api() == 401
    assert Browser(live.admin_url).login().page() == 200  # logging in again works


def test_a_password_change_ends_every_session(live):
    browser = Browser(live.admin_url).login()
    thief = browser.copy()
    _change("admin", lambda u: u.set_password("a-new-password-1"))
    assert browser.page() == 302 and thief.page() == 302 and thief.api() == 401
    assert Browser(live.admin_url).login("admin", "a-new-password-1").page() == 200


def test_a_role_change_ends_every_session(live):
    browser = Browser(live.admin_url).login("viewer", "viewer-pass-123")
    assert browser.page("/settings/users") == 403
    _change("viewer", lambda u: u.set_role("admin", "test"))
    assert browser.page() == 302 and browser.api() == 401
    assert Browser(live.admin_url).login("viewer", "viewer-pass-123").page("/settings/users") == 200


def test_disabling_ends_sessions_and_tokens_and_enabling_brings_back_only_the_tokens(live, cast):
    _, token = ApiToken.issue(cast.viewer, "script")
    db.session.commit()
    bearer = {"Authorization": f"Bearer {token}"}
    browser = Browser(live.admin_url).login("viewer", "viewer-pass-123")
    assert requests.get(live.admin_url + "/api/hosts", headers=bearer, timeout=10).status_code == 200

    _change("viewer", lambda u: u.disable("test"))
    assert browser.page() == 302 and browser.api() == 401
    r = requests.get(live.admin_url + "/api/hosts", headers=bearer, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # the right password no longer logs in either, and says why only to whoever knows it
    page = browser.http.get(live.admin_url + "/login", timeout=10).text
    r = browser.http.post(
        live.admin_url + "/login",
        data={"username": "viewer", "password": "viewer-pass-123", "csrf_token": _FORM_CSRF.search(page).group(1)},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 200 and "This account is disabled" in r.text

    _change("viewer", lambda u: u.enable("test"))
    assert requests.get(live.admin_url + "/api/hosts", headers=bearer, timeout=10).status_code == 200
    assert browser.page() == 302  # the old session stays dead: enabling is not un-logging-out


def test_a_session_from_before_session_versions_loads_nobody(client, cast):
    with client.session_transaction() as s:
        s["_user_id"] = str(cast.admin.id)  # what Flask-Login stored before this change
        s["_fresh"] = True
    assert client.get("/").status_code == 302
    assert client.get("/api/version").status_code == 401
