"""What a request may carry, over real HTTP to the real two-plane server (waitress and werkzeug):
the body limit on both planes (413 in the caller's format), bounded JSON nesting, ids the
database can hold, multipart and JSON bodies sent to HTML forms, and the ``Allow`` header on 405.
Each case was a 500 (or an unbounded read) before; each must now be a 4xx that says why.
"""

from __future__ import annotations

import re
import socket

import pytest
import requests
from hypothesis import example, given
from hypothesis import strategies as st

from app.inputs import MAX_ID, MAX_JSON_DEPTH, BoundedIntConverter

pytestmark = pytest.mark.timeout(60)

TOO_BIG = MAX_ID + 1  # 2**31: NumericValueOutOfRange on PostgreSQL before
HUGE = 2**63  # the attack run's value: OverflowError on SQLite before


@pytest.fixture(scope="module")
def setup(module_live, module_app):
    """The module's admin (``limits-admin``), API token and host.

    Every test that logs in as that admin asks for this fixture. Five of them used to rely on an
    earlier test having made the user: run without it first (alone, ``--lf``, or the rest of the
    module on a fresh xdist worker after a crash) their login got the login page back (200).
    """
    from app.extensions import db
    from app.models import ApiToken, Host, User

    admin = User(username="limits-admin", role="admin")
    admin.set_password("admin-pass-123")
    db.session.add(admin)
    _, token = ApiToken.issue(admin, "limits")
    host, agent_token = Host.enrol("limits-host")
    db.session.commit()
    return {
        "token": token,
        "agent_token": agent_token,
        "host_id": host.id,
        "limit": module_app.config["MAX_CONTENT_LENGTH"],
    }


@pytest.fixture
def api(module_live, setup):
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {setup['token']}"
    yield s
    s.close()


def error_code(r: requests.Response) -> str:
    assert r.headers["Content-Type"].startswith("application/json"), r.text[:200]
    return r.json()["error"]["code"]


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``) on a fresh socket; return the whole answer once the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


# --- the body limit ---------------------------------------------------------------------------


def test_an_api_body_over_the_limit_is_413_json_and_a_body_at_the_limit_is_read(module_live, api, setup):
    limit = setup["limit"]
    over = b'{"name": "big", "pad": "' + b"x" * limit + b'"}'
    r = api.post(module_live.admin_url + "/api/hosts", data=over, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_code(r) == "payload_too_large"
    assert "1024 KiB" in r.json()["error"]["message"]

    head = b'{"name": "at-limit", "pad": "'
    exact = head + b"x" * (limit - len(head) - 2) + b'"}'
    assert len(exact) == limit
    r = api.post(module_live.admin_url + "/api/hosts", data=exact, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


def test_a_chunked_api_body_over_the_limit_is_413_json(module_live, api, setup):
    def chunks():
        yield b'{"name": "chunked", "pad": "'
        for _ in range(setup["limit"] // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = api.post(module_live.admin_url + "/api/hosts", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_code(r) == "payload_too_large"


def test_a_21_mb_body_is_refused_by_its_header_before_a_byte_of_it_is_read(module_live, setup):
    """The attack run's 21 MB body took the server from 83 to 619 MB RSS. Now waitress answers from
    the Content-Length alone: the 413 arrives although the client never sends the body."""
    head = (
        "POST /api/hosts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {setup['token']}\r\nContent-Length: {21 * 1024 * 1024}\r\n\r\n"
    )
    answer = raw_request(module_live.servers.admin_port, head)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), answer[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers and b"application/json" in headers
    assert b'"payload_too_large"' in body


def test_a_page_body_over_the_limit_is_a_413_page(module_live, setup):
    r = requests.post(
        module_live.admin_url + "/login", data={"username": "u", "password": "p" * (setup["limit"] + 1)}, timeout=10
    )
    assert r.status_code == 413 and r.headers["Content-Type"].startswith("text/html")
    assert "Request Entity Too Large" in r.text


def test_the_agent_plane_refuses_a_body_over_the_limit_with_413_json(module_live, setup):
    r = requests.post(module_live.agent_http_url + "/agent/install.sh", data=b"x" * (setup["limit"] + 1), timeout=10)
    assert r.status_code == 413 and error_code(r) == "payload_too_large"


# --- JSON nesting and non-object bodies -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000,  # was a RecursionError: 500
        '{"a":' * 100_000,
        '{"name": "deep", "x": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}",
        "null",
        "[]",
        '"a string"',
        "{",
    ],
    ids=["deep-array", "deep-object", "one-too-deep", "null", "array", "string", "truncated"],
)
def test_a_body_that_is_not_a_shallow_json_object_is_400_invalid_json(module_live, api, body):
    r = api.post(module_live.admin_url + "/api/hosts", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and error_code(r) == "invalid_json"


def test_json_nested_to_the_limit_is_accepted(module_live, api):
    depth = MAX_JSON_DEPTH - 1  # the body object itself is the first level
    body = '{"name": "deep-ok", "x": ' + "[" * depth + "]" * depth + "}"
    r = api.post(module_live.admin_url + "/api/hosts", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


# --- forms take text only ----------------------------------------------------------------------


def _login_page_csrf(session: requests.Session, base: str) -> str:
    page = session.get(base + "/login", timeout=10)
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)


def test_a_multipart_login_with_the_password_as_a_file_is_a_form_error(module_live, setup):
    s = requests.Session()
    csrf = _login_page_csrf(s, module_live.admin_url)
    r = s.post(
        module_live.admin_url + "/login",
        data={"username": "limits-admin", "csrf_token": csrf},
        files={"password": ("password.txt", b"admin-pass-123")},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("text/html")
    assert "This field is required." in r.text


@pytest.mark.parametrize("body", ['"abc"', "[1, 2, 3]", '{"username": {"a": 1}, "password": ["x"]}', "null"])
def test_a_json_login_is_a_form_error(module_live, body):
    s = requests.Session()
    _login_page_csrf(s, module_live.admin_url)
    r = s.post(
        module_live.admin_url + "/login",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code == 400, r.text[:300]


# --- ids the database can hold -----------------------------------------------------------------

ID_ROUTES = [
    ("GET", "/api/hosts/{id}"),
    ("DELETE", "/api/hosts/{id}"),
    ("GET", "/api/hosts/{id}/jobs"),
    ("POST", "/api/hosts/{id}/ping"),
    ("POST", "/api/hosts/{id}/revoke"),
    ("POST", "/api/hosts/{id}/update"),
    ("GET", "/api/fleet-updates/{id}"),
    ("POST", "/api/fleet-updates/{id}/cancel"),
]


@given(st.integers(min_value=0, max_value=10**25))
@example(MAX_ID)
@example(MAX_ID + 1)
@example(2**63)
@example(0)
def test_the_id_converter_matches_exactly_the_numbers_an_id_column_holds(n):
    assert (re.fullmatch(BoundedIntConverter.regex, str(n)) is not None) == (n <= MAX_ID)


@pytest.mark.parametrize("method,route", ID_ROUTES)
@pytest.mark.parametrize("value", [TOO_BIG, HUGE, 10**30, MAX_ID])
def test_an_id_too_large_for_the_database_is_404_json(module_live, api, method, route, value):
    r = api.request(method, module_live.admin_url + route.format(id=value), json={})
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json"), r.text[:200]


@pytest.mark.parametrize("path", ["/hosts/{id}", "/hosts/{id}/update-status", "/settings/fleet-update/{id}/cancel"])
def test_an_id_too_large_for_the_database_is_404_on_pages(module_live, setup, path):
    from tests.support.live import LiveClient

    s = LiveClient(module_live.admin_url).login("limits-admin", "admin-pass-123")
    method = "POST" if path.endswith("cancel") else "GET"
    token = s.csrf_token()
    for value in (TOO_BIG, HUGE):
        r = s.http.request(method, module_live.admin_url + path.format(id=value), headers={"X-CSRFToken": token})
        assert r.status_code == 404 and r.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    "query",
    [
        f"audit?before_id={TOO_BIG}",
        f"audit?before_id={HUGE}",
        "audit?before_id=0",
        "audit?before_id=1_000",
        "audit?before_id=%EF%BC%91",  # a full-width digit: int() takes it
        "audit?before_id=",
        "audit?limit=0",
        "audit?limit=501",
        "hosts/1/jobs?limit=501",
        "fleet-updates?limit=201",
        "hosts?updates=x",
        "hosts?updates=",
        "alerts?status=x",
    ],
)
def test_an_out_of_range_query_is_400_invalid_parameter(module_live, api, query):
    r = api.get(module_live.admin_url + "/api/" + query)
    assert r.status_code == 400 and error_code(r) == "invalid_parameter"


def test_the_audit_page_ignores_a_before_id_it_cannot_use(module_live, setup):
    from tests.support.live import LiveClient

    s = LiveClient(module_live.admin_url).login("limits-admin", "admin-pass-123")
    for value in (TOO_BIG, HUGE):
        r = s.http.get(module_live.admin_url + f"/audit?before_id={value}", timeout=10)
        assert r.status_code == 200


@pytest.mark.parametrize("host_ids", [[TOO_BIG], [0], [-1], [], [1, 1], ["1"], [True], [1.5], "1", {"a": 1}], ids=repr)
def test_malformed_host_ids_are_400_invalid_host_ids(module_live, api, host_ids):
    r = api.post(module_live.admin_url + "/api/fleet/update", json={"host_ids": host_ids})
    assert r.status_code == 400 and error_code(r) == "invalid_host_ids"


def test_well_formed_host_ids_of_no_host_are_still_422(module_live, api, setup):
    r = api.post(module_live.admin_url + "/api/fleet/update", json={"host_ids": [setup["host_id"], MAX_ID]})
    assert r.status_code == 422 and error_code(r) == "unknown_host_ids"


# --- 405 names the methods that work -----------------------------------------------------------


def test_405_carries_allow_on_the_api_and_on_pages(module_live, api):
    r = api.put(module_live.admin_url + "/api/hosts")
    assert r.status_code == 405 and error_code(r) == "method_not_allowed"
    assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS", "POST"}

    r = requests.delete(module_live.admin_url + "/login", timeout=10)
    assert r.status_code == 405 and r.headers["Content-Type"].startswith("text/html")
    assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS", "POST"}


# --- NUL characters (PostgreSQL refuses them in text: a DataError, 500, before) -----------------


def test_a_job_id_with_nul_is_404(module_live, api):
    r = api.get(module_live.admin_url + "/api/jobs/a%00b")
    assert r.status_code == 404 and error_code(r) == "job_not_found"


@pytest.mark.parametrize("name", ["a\x00b", "line\nbreak", "\x7f"], ids=["nul", "newline", "del"])
def test_an_api_token_name_with_control_characters_is_400(module_live, api, name):
    r = api.post(module_live.admin_url + "/api/tokens", json={"name": name})
    assert r.status_code == 400 and error_code(r) == "invalid_name"


def test_a_login_with_nul_in_the_username_is_a_form_error(module_live):
    s = requests.Session()
    csrf = _login_page_csrf(s, module_live.admin_url)
    r = s.post(
        module_live.admin_url + "/login",
        data={"username": "limits\x00admin", "password": "x", "csrf_token": csrf},
        timeout=10,
        allow_redirects=False,
    )
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("name", ["a\x00b", "line\nbreak"], ids=["nul", "newline"])
def test_a_token_name_with_control_characters_is_a_form_error_on_the_page(module_live, setup, name):
    from tests.support.live import LiveClient

    s = LiveClient(module_live.admin_url).login("limits-admin", "admin-pass-123")
    page = s.http.get(module_live.admin_url + "/settings/tokens", timeout=10).text
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    before = _token_count()
    r = s.http.post(module_live.admin_url + "/settings/tokens", data={"name": name, "csrf_token": csrf}, timeout=10)
    assert r.status_code == 200 and "No control characters." in r.text
    assert _token_count() == before


def _token_count() -> int:
    import sqlalchemy as sa

    from app.extensions import db
    from app.models import ApiToken

    db.session.remove()
    return db.session.scalar(sa.select(sa.func.count()).select_from(ApiToken))


@pytest.mark.parametrize("target", ["/a%0d%0aSet-Cookie:%20x=1", "/a%0ab", "/a%00b"], ids=["crlf", "lf", "nul"])
def test_a_next_url_with_control_characters_goes_to_the_dashboard(module_live, setup, target):
    from tests.support.live import LiveClient

    s = LiveClient(module_live.admin_url).login("limits-admin", "admin-pass-123")
    r = s.http.get(module_live.admin_url + "/login?next=" + target, allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == "/"


@pytest.mark.parametrize("path", ["/agent/download/1.0%00", "/agent/download/current?platform=a%00b"])
def test_a_download_name_with_nul_is_404_json(module_live, setup, path):
    r = requests.get(
        module_live.agent_http_url + path, headers={"Authorization": f"Bearer {setup['agent_token']}"}, timeout=10
    )
    assert r.status_code == 404 and error_code(r) == "release_not_found"
