"""POST /alerts/<id>/ack and POST /api/alerts/<id>/ack: acknowledge an open alert."""

from app.extensions import db
from app.models import Alert, AuditEvent
from tests.web.helpers import HX, audit_actions, bearer, error_code


def _alert(alert_id):
    db.session.expire_all()
    return db.session.get(Alert, alert_id)


def _open_alert(cast, key="1"):
    a = Alert.raise_or_touch("update_failed", key, "update of app-1 timed out", host_id=cast.host_behind.id)
    db.session.commit()
    return a.id


def test_an_admin_acknowledges_from_the_page_and_it_shows_by_whom_and_when(as_admin, cast):
    aid = _open_alert(cast)
    html = as_admin.get("/alerts").get_data(as_text=True)
    assert f"/alerts/{aid}/ack" in html and "Acknowledge</button>" in html
    r = as_admin.post(f"/alerts/{aid}/ack")
    assert r.status_code == 303 and r.headers["Location"] == "/alerts"
    a = _alert(aid)
    assert a.acknowledged_by == "admin" and a.acknowledged_at is not None and a.resolved_at is None
    ev = db.session.scalar(db.select(AuditEvent).where(AuditEvent.action == "alert.acknowledged"))
    assert ev.actor == "admin" and ev.target == f"alert:{aid}" and ev.details["kind"] == "update_failed"
    html = as_admin.get("/alerts").get_data(as_text=True)
    row = html[html.index(f'data-alert="{aid}"') :]
    assert "acknowledged</span>" in row and "by admin" in row and f"/alerts/{aid}/ack" not in html


def test_the_htmx_variant_redirects_and_a_second_ack_changes_nothing(as_admin, cast):
    aid = _open_alert(cast)
    r = as_admin.post(f"/alerts/{aid}/ack", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/alerts"
    first = _alert(aid).acknowledged_at
    assert as_admin.post(f"/alerts/{aid}/ack", headers=HX).status_code == 204
    assert _alert(aid).acknowledged_at == first
    assert audit_actions().count("alert.acknowledged") == 1


def test_an_acknowledged_alert_stays_acknowledged_when_it_recurs(as_admin, cast):
    aid = _open_alert(cast)
    as_admin.post(f"/alerts/{aid}/ack")
    again = Alert.raise_or_touch("update_failed", "1", "timed out again")
    db.session.commit()
    assert again.id == aid and again.count == 2 and _alert(aid).acknowledged_by == "admin"


def test_viewers_see_no_button_and_get_403(as_viewer, cast):
    aid = _open_alert(cast)
    html = as_viewer.get("/alerts").get_data(as_text=True)
    assert f"/alerts/{aid}/ack" not in html
    assert as_viewer.post(f"/alerts/{aid}/ack").status_code == 403
    assert as_viewer.post(f"/alerts/{aid}/ack", headers=HX).status_code == 403
    assert _alert(aid).acknowledged_at is None and "alert.acknowledged" not in audit_actions()


def test_a_missing_alert_is_404_and_a_resolved_one_is_refused(as_admin, cast):
    r = as_admin.post("/alerts/9999/ack")
    assert r.status_code == 404 and "no alert with id 9999" in r.get_data(as_text=True)
    aid = _open_alert(cast)
    Alert.resolve("update_failed", "1")
    db.session.commit()
    r = as_admin.post(f"/alerts/{aid}/ack")
    assert r.status_code == 303
    assert "already resolved" in as_admin.get("/alerts").get_data(as_text=True)
    assert _alert(aid).acknowledged_at is None
    assert as_admin.get(f"/alerts/{aid}/ack").status_code == 405


# --- API ---------------------------------------------------------------------------------------


def test_the_api_acknowledges_and_answers_the_alert(client, cast, admin_token):
    aid = _open_alert(cast)
    r = client.post(f"/api/alerts/{aid}/ack", headers=bearer(admin_token))
    assert r.status_code == 200
    alert = r.get_json()["alert"]
    assert alert["id"] == aid and alert["acknowledged_by"].startswith("admin (token ")
    assert alert["acknowledged_at"] is not None and alert["open"] is True
    assert _alert(aid).acknowledged_at is not None
    listed = client.get("/api/alerts", headers=bearer(admin_token)).get_json()["alerts"]
    assert listed[0]["acknowledged_by"] == alert["acknowledged_by"]


def test_the_api_refuses_viewers_missing_and_resolved_alerts(client, cast, admin_token, viewer_token):
    aid = _open_alert(cast)
    r = client.post(f"/api/alerts/{aid}/ack", headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden" and _alert(aid).acknowledged_at is None
    r = client.post("/api/alerts/9999/ack", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "alert_not_found"
    Alert.resolve("update_failed", "1")
    db.session.commit()
    r = client.post(f"/api/alerts/{aid}/ack", headers=bearer(admin_token))
    assert r.status_code == 409 and error_code(r) == "alert_resolved"
