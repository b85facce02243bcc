"""/settings/tokens: an admin's own API tokens."""

from app.extensions import db
from app.models import ApiToken
from tests.web.helpers import HX, audit_actions


def test_an_admin_creates_a_token_and_sees_it_once(as_admin, cast):
    r = as_admin.post("/settings/tokens", data={"name": "deploy"})
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    plain = html.split('id="new-token">')[1].split("<")[0]
    tok = ApiToken.lookup(plain)
    assert tok is not None and tok.name == "deploy" and tok.user_id == cast.admin.id
    again = as_admin.get("/settings/tokens").get_data(as_text=True)
    assert plain not in again and f"{tok.prefix}…" in again
    assert "token.created" in audit_actions()


def test_an_admin_revokes_a_token(as_admin, cast):
    tok, plain = ApiToken.issue(cast.admin, "old")
    db.session.commit()
    r = as_admin.post(f"/settings/tokens/{tok.id}/revoke")
    assert r.status_code == 303
    db.session.expire_all()
    assert ApiToken.lookup(plain) is None
    assert "token.revoked" in audit_actions()


def test_revoking_over_htmx_redirects(as_admin, cast):
    tok, _ = ApiToken.issue(cast.admin, "old")
    db.session.commit()
    r = as_admin.post(f"/settings/tokens/{tok.id}/revoke", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/tokens"


def test_an_admin_cannot_revoke_someone_elses_token_or_a_missing_one(as_admin, cast):
    tok, plain = ApiToken.issue(cast.viewer, "theirs")
    db.session.commit()
    assert as_admin.post(f"/settings/tokens/{tok.id}/revoke").status_code == 404
    assert as_admin.post("/settings/tokens/9999/revoke").status_code == 404
    assert ApiToken.lookup(plain) is not None


def test_viewers_get_403(as_viewer, cast):
    assert as_viewer.get("/settings/tokens").status_code == 403
    assert as_viewer.post("/settings/tokens", data={"name": "x"}).status_code == 403
    assert db.session.scalar(db.select(db.func.count(ApiToken.id))) == 0


def test_revoke_refuses_get(as_admin, cast):
    tok, _ = ApiToken.issue(cast.admin, "x")
    db.session.commit()
    assert as_admin.get(f"/settings/tokens/{tok.id}/revoke").status_code == 405
