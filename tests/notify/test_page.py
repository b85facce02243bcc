"""/settings/notifications: everyone signed in sees the delivery state (no secrets); admins send a test."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import AuditEvent
from app.notify import Notifier, Webhook
from app.runtime import runtime
from tests.notify.conftest import SECRET
from tests.support.receivers import free_port

pytestmark = pytest.mark.timeout(30)


def audit(action):
    db.session.rollback()
    return db.session.scalars(sa.select(AuditEvent).where(AuditEvent.action == action)).all()


def test_a_viewer_sees_the_destination_and_how_it_went_but_no_button(client, auth, cast, app, receiver):
    auth.login("viewer", "viewer-pass-123")
    r = client.get("/settings/notifications")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    port = receiver.url.split(":")[2].split("/")[0]
    assert f"http://127.0.0.1:{port}/…" in html and "nothing sent yet" in html
    assert "rm-secret-path" not in html and SECRET not in html
    assert "Send test notification" not in html


def test_an_admin_sends_a_test_notification_audited_and_the_receiver_gets_it(client, auth, cast, app, receiver):
    auth.login()
    r = client.post("/settings/notifications/test")
    assert r.status_code == 303 and r.headers["Location"].endswith("/settings/notifications")
    (ev,) = audit("notifications.test_sent")
    assert ev.actor == "admin" and ev.details["destinations"] == [runtime(app).notifier.status()[0].destination]
    runtime(app).notifier.drain()
    (call,) = receiver.wait_for(lambda c: len(c) == 1)
    assert call["json"]["event"] == "test" and "admin" in call["json"]["text"]
    html = client.get("/settings/notifications").get_data(as_text=True)
    assert "delivered" in html and "last delivery failed" not in html


def test_the_htmx_test_button_redirects_the_page(client, auth, cast, app):
    auth.login()
    r = client.post("/settings/notifications/test", headers={"HX-Request": "true"})
    assert r.status_code == 204 and r.headers["HX-Redirect"].endswith("/settings/notifications")


def test_a_failed_delivery_shows_time_destination_and_error_without_secrets(client, auth, cast, app, clock):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/SECRET-PATH-TOKEN?sig=SECRET-QUERY"
    rt = runtime(app)
    rt.notifier = Notifier([Webhook(url, SECRET)], rt.clock.now, attempts=2, sleep=lambda s: None)
    auth.login()
    client.post("/settings/notifications/test")
    rt.notifier.drain()
    auth.logout()
    auth.login("viewer", "viewer-pass-123")
    html = client.get("/settings/notifications").get_data(as_text=True)
    assert "last delivery failed" in html and "ConnectionError" in html
    assert f"http://127.0.0.1:{port}/…" in html and clock.now().strftime("%Y-%m-%d %H:%M") in html
    for secret in ("SECRET-PATH-TOKEN", "SECRET-QUERY", SECRET):
        assert secret not in html


def test_a_viewer_may_not_send_a_test(client, auth, cast, app):
    auth.login("viewer", "viewer-pass-123")
    assert client.post("/settings/notifications/test").status_code == 403
    assert runtime(app).notifier.pending() == 0 and audit("notifications.test_sent") == []


def test_the_test_button_is_refused_when_nothing_is_configured(client, auth, cast, app):
    rt = runtime(app)
    rt.notifier = Notifier([], rt.clock.now)
    auth.login()
    html = client.get("/settings/notifications").get_data(as_text=True)
    assert "No destination is configured" in html and "Send test notification" not in html
    r = client.post("/settings/notifications/test")
    assert r.status_code == 303
    assert "No destination is configured" in client.get("/settings/notifications").get_data(as_text=True)
    assert audit("notifications.test_sent") == []


def test_anonymous_callers_are_sent_to_login(client):
    r = client.get("/settings/notifications")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_get_is_not_a_way_to_send(client, auth, cast):
    auth.login()
    assert client.get("/settings/notifications/test").status_code == 405


def test_the_api_shows_a_failed_delivery_to_a_viewer_token_without_secrets(client, cast, app):
    from app.models import ApiToken

    port = free_port()
    rt = runtime(app)
    hook = Webhook(f"http://127.0.0.1:{port}/hooks/SECRET-PATH-TOKEN", SECRET)
    rt.notifier = Notifier([hook], rt.clock.now, attempts=3, sleep=lambda s: None)
    rt.notifier.submit({"event": "test", "id": "1", "title": "t", "text": "t"})
    rt.notifier.drain()
    _, token = ApiToken.issue(cast.viewer, "read")
    db.session.commit()
    r = client.get("/api/notifications", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    body = r.get_json()["notifications"]
    assert body["running"] is False and body["pending"] == 0 and body["dropped"] == 0
    (dest,) = body["destinations"]
    assert dest["kind"] == "webhook" and dest["destination"] == f"http://127.0.0.1:{port}/…"
    assert dest["failing"] is True and dest["failed"] == 1 and dest["last_event"] == "test"
    assert dest["last_failure_at"].endswith("Z") and "ConnectionError" in dest["last_error"]
    assert "SECRET-PATH-TOKEN" not in r.get_data(as_text=True) and SECRET not in r.get_data(as_text=True)
