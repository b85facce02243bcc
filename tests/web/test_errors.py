"""Error answers: JSON for the API and JSON-preferring clients, HTML pages otherwise; 500 rolls back."""

import pytest

from app.extensions import db
from app.models import AuditEvent


def test_an_unknown_api_path_is_json_404(client):
    r = client.get("/api/nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"


def test_an_unknown_page_is_an_html_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.mimetype == "text/html" and b"404" in r.data


def test_a_client_preferring_json_gets_json_on_pages(client):
    r = client.get("/nope", headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"


def test_a_viewer_on_an_admin_page_gets_an_html_403(as_viewer):
    r = as_viewer.get("/hosts/new")
    assert r.status_code == 403 and r.mimetype == "text/html" and b"admin role" in r.data


@pytest.fixture
def boom_app(app):
    app.config["PROPAGATE_EXCEPTIONS"] = False

    def boom():
        AuditEvent.record("tester", "half.written", "x")
        db.session.flush()
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", "boom", boom)
    app.add_url_rule("/api/boom", "api_boom", boom)
    return app


def test_a_500_rolls_back_and_hides_the_exception(boom_app, client, caplog):
    r = client.get("/boom")
    assert r.status_code == 500 and b"secret internals" not in r.data
    r = client.get("/api/boom")
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal_error"
    assert b"secret internals" not in r.data
    assert db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "half.written")) is None
