"""No input gives a 500 on the pages either: hypothesis sends every page route of the admin plane
hostile query strings and form fields (control characters, NUL, numbers past any column, odd
names), as a logged-in admin with a valid CSRF token, to the live server (real waitress).

The OpenAPI document drives schemathesis over ``/api`` (``test_schemathesis.py``); the pages have
no such document, so this test draws the routes from the app's own URL map.
"""

from __future__ import annotations

import re

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.serve import AGENT_PLANE_PREFIXES

pytestmark = pytest.mark.timeout(120)

FIELDS = ["name", "next", "updates", "before_id", "status", "username", "password", "host_ids", "allow_downgrade"]
HOSTILE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x00", "a\r\nb", "9223372036854775808", "2147483648", "-1", "0", "1_0", "１", "%00", "behind"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
IDS = st.one_of(st.integers(min_value=0, max_value=5), st.sampled_from([2**31 - 1, 2**31, 2**63, 10**30]))
# Built once: a strategy built inside the test is built and validated again for every example.
FORM_FIELDS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), HOSTILE, max_size=4)
HTMX = st.booleans()


def _page_rules(app) -> list[tuple[str, str]]:
    """(rule, method) for every page route: not /api, not the agent plane, not static, not logout."""
    out = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        if path.startswith(("/api/", "/static")) or path.startswith(AGENT_PLANE_PREFIXES) or path == "/logout":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((path, method))
    return sorted(out)


@pytest.fixture(scope="module")
def routes(module_app):
    """The page routes to draw from, as one strategy made once per module."""
    return st.sampled_from(_page_rules(module_app))


@pytest.fixture(scope="module")
def admin(module_live, module_app):
    from app.extensions import db
    from app.models import Host, User
    from tests.support.live import LiveClient

    user = User(username="fuzz-admin", role="admin")
    user.set_password("admin-pass-123")
    db.session.add(user)
    for name in ("fuzz-1", "fuzz-2"):
        Host.enrol(name)
    db.session.commit()
    session = LiveClient(module_live.admin_url).login("fuzz-admin", "admin-pass-123")
    return session, session.csrf_token()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_page_input_gives_a_500(module_live, routes, admin, data):
    session, csrf = admin
    path, method = data.draw(routes, label="route")
    url = re.sub(r"<int:\w+>", lambda _: str(data.draw(IDS, label="id")), path)
    url = re.sub(r"<(?:\w+:)?\w+>", lambda _: requests.utils.quote(data.draw(HOSTILE, label="part"), safe=""), url)
    fields = data.draw(FORM_FIELDS)
    headers = {"X-CSRFToken": csrf}
    if data.draw(HTMX, label="htmx"):
        headers["HX-Request"] = "true"
    if method == "GET":
        r = session.http.get(module_live.admin_url + url, params=fields, headers=headers, timeout=10)
    else:
        fields.setdefault("csrf_token", csrf)
        r = session.http.request(method, module_live.admin_url + url, data=fields, headers=headers, timeout=10)
    assert r.status_code < 500, f"{method} {url} {fields!r} -> {r.status_code}: {r.text[:300]}"
    if r.status_code == 302 and r.headers.get("Location", "").startswith("/login"):
        session.login("fuzz-admin", "admin-pass-123")  # a page that logged us out: keep fuzzing signed in
