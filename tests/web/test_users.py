"""User accounts for admins: the /settings/users page and /api/users, tokens per user, the last admin."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.extensions import db
from app.models import ApiToken, AuditEvent, User
from tests.web.helpers import HX, audit_actions, bearer, error_code


def _user(name: str) -> User | None:
    db.session.expire_all()
    return db.session.scalar(sa.select(User).where(User.username == name))


def _add(name: str, role: str = "viewer") -> User:
    u = User.create(name, f"{name}-pass-123", role)
    db.session.commit()
    return u


def _audit(action: str) -> AuditEvent:
    db.session.expire_all()
    return db.session.scalars(sa.select(AuditEvent).where(AuditEvent.action == action)).all()[-1]


# --- the page ---------------------------------------------------------------------------------


def test_the_users_page_lists_accounts_and_active_tokens(as_admin, cast):
    ApiToken.issue(cast.viewer, "viewer-script")
    revoked, _ = ApiToken.issue(cast.viewer, "old-script")
    revoked.revoke("test")
    db.session.commit()
    html = as_admin.get("/settings/users").get_data(as_text=True)
    assert 'data-user="admin"' in html and 'data-user="viewer"' in html
    assert "viewer-script" in html and "old-script" not in html
    assert 'hx-confirm="Delete viewer' in html and f'hx-post="/settings/users/{cast.viewer.id}/disable"' in html


def test_viewers_may_not_see_or_change_users(as_viewer, cast):
    assert as_viewer.get("/settings/users").status_code == 403
    assert as_viewer.post(f"/settings/users/{cast.admin.id}/disable").status_code == 403
    assert as_viewer.post(f"/settings/users/{cast.admin.id}/delete").status_code == 403
    assert _user("admin").is_active


def test_an_admin_disables_and_enables_a_user_from_the_page(as_admin, cast):
    r = as_admin.post(f"/settings/users/{cast.viewer.id}/disable")
    assert r.status_code == 303 and r.headers["Location"] == "/settings/users"
    assert not _user("viewer").is_active
    assert _audit("user.disabled").target == "viewer" and _audit("user.disabled").actor == "admin"
    assert "is disabled" in as_admin.get("/settings/users").get_data(as_text=True)

    r = as_admin.post(f"/settings/users/{cast.viewer.id}/enable", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/users"
    assert _user("viewer").is_active
    assert "user.enabled" in audit_actions()


def test_an_admin_deletes_a_user_and_their_tokens_from_the_page(as_admin, cast):
    _, plain = ApiToken.issue(cast.viewer, "script")
    db.session.commit()
    r = as_admin.post(f"/settings/users/{cast.viewer.id}/delete", headers=HX)
    assert r.status_code == 204 and r.headers["HX-Redirect"] == "/settings/users"
    assert _user("viewer") is None
    assert ApiToken.lookup(plain) is None
    assert db.session.scalar(sa.select(sa.func.count(ApiToken.id))) == 0
    ev = _audit("user.deleted")
    assert ev.target == "viewer" and ev.details["tokens"] == 1


def test_an_admin_revokes_another_users_token_from_the_page(as_admin, cast):
    tok, plain = ApiToken.issue(cast.viewer, "script")
    db.session.commit()
    r = as_admin.post(f"/settings/users/tokens/{tok.id}/revoke")
    assert r.status_code == 303
    db.session.expire_all()
    assert ApiToken.lookup(plain) is None
    ev = _audit("token.revoked")
    assert ev.details == {"token_id": tok.id, "user": "viewer"}


def test_the_page_refuses_the_last_admin_with_a_message(as_admin, cast):
    for action in ("disable", "delete"):
        r = as_admin.post(f"/settings/users/{cast.admin.id}/{action}", follow_redirects=True)
        assert r.status_code == 200
        assert "it is the last enabled admin" in r.get_data(as_text=True)
    assert _user("admin").is_active
    assert "user.disabled" not in audit_actions() and "user.deleted" not in audit_actions()


def test_page_actions_need_post_and_an_existing_object(as_admin, cast):
    assert as_admin.get(f"/settings/users/{cast.viewer.id}/disable").status_code == 405
    assert as_admin.post("/settings/users/9999/disable").status_code == 404
    assert as_admin.post("/settings/users/9999/delete").status_code == 404
    assert as_admin.post("/settings/users/tokens/9999/revoke").status_code == 404


# --- the API ----------------------------------------------------------------------------------


def test_admins_list_users_over_the_api_and_viewers_get_403(client, cast, admin_token, viewer_token):
    r = client.get("/api/users", headers=bearer(admin_token))
    assert r.status_code == 200
    users = {u["username"]: u for u in r.get_json()["users"]}
    assert users["viewer"] == {
        "id": cast.viewer.id,
        "username": "viewer",
        "role": "viewer",
        "created_at": users["viewer"]["created_at"],
        "disabled": False,
        "disabled_at": None,
    }
    r = client.get("/api/users", headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"


def test_disabling_over_the_api_makes_the_users_tokens_answer_401(client, cast, admin_token, viewer_token):
    assert client.get("/api/hosts", headers=bearer(viewer_token)).status_code == 200
    r = client.post(f"/api/users/{cast.viewer.id}/disable", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["user"]["disabled"] is True
    r = client.get("/api/hosts", headers=bearer(viewer_token))
    assert r.status_code == 401 and error_code(r) == "unauthorized"
    assert _audit("user.disabled").actor.startswith("admin (token ")
    # idempotent, and audited once
    assert client.post(f"/api/users/{cast.viewer.id}/disable", headers=bearer(admin_token)).status_code == 200
    assert audit_actions().count("user.disabled") == 1

    r = client.post(f"/api/users/{cast.viewer.id}/enable", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["user"]["disabled"] is False
    assert client.get("/api/hosts", headers=bearer(viewer_token)).status_code == 200


def test_a_disabled_admin_cannot_mint_tokens(client, cast, admin_token):
    second = _add("second-admin", "admin")
    _, second_token = ApiToken.issue(second, "script")
    db.session.commit()
    assert client.post(f"/api/users/{second.id}/disable", headers=bearer(admin_token)).status_code == 200
    r = client.post("/api/tokens", json={"name": "sneaky"}, headers=bearer(second_token))
    assert r.status_code == 401
    assert db.session.scalar(sa.select(ApiToken.id).where(ApiToken.name == "sneaky")) is None


def test_deleting_over_the_api_takes_the_tokens_and_never_leaves_an_orphan(client, cast, admin_token, viewer_token):
    r = client.delete(f"/api/users/{cast.viewer.id}", headers=bearer(admin_token))
    assert r.status_code == 204
    assert _user("viewer") is None
    r = client.get("/api/hosts", headers=bearer(viewer_token))
    assert r.status_code == 401  # not a 500 from a token without a user
    assert client.delete(f"/api/users/{cast.viewer.id}", headers=bearer(admin_token)).status_code == 404


def test_the_last_enabled_admin_is_refused_with_a_typed_error(client, cast, admin_token):
    for method, path in (("post", "disable"), ("delete", "")):
        r = getattr(client, method)(f"/api/users/{cast.admin.id}/{path}".rstrip("/"), headers=bearer(admin_token))
        assert r.status_code == 409 and error_code(r) == "last_admin", r.get_json()
    assert _user("admin").is_active
    # a second admin makes it possible; a disabled second admin does not count
    second = _add("second-admin", "admin")
    second.disable("test")
    db.session.commit()
    assert client.post(f"/api/users/{cast.admin.id}/disable", headers=bearer(admin_token)).status_code == 409
    second.enable("test")
    db.session.commit()
    r = client.post(f"/api/users/{cast.admin.id}/disable", headers=bearer(admin_token))
    assert r.status_code == 200  # and it was the caller's own account: its token stops working
    assert client.get("/api/version", headers=bearer(admin_token)).status_code == 401


def test_tokens_are_listed_per_user_and_any_can_be_revoked(client, cast, admin_token, viewer_token):
    r = client.get(f"/api/users/{cast.viewer.id}/tokens", headers=bearer(admin_token))
    assert r.status_code == 200
    (tok,) = r.get_json()["api_tokens"]
    assert tok["user_id"] == cast.viewer.id and tok["revoked"] is False and "token_hash" not in tok
    r = client.post(f"/api/tokens/{tok['id']}/revoke", headers=bearer(admin_token))
    assert r.status_code == 200 and r.get_json()["api_token"]["revoked"] is True
    assert client.get("/api/hosts", headers=bearer(viewer_token)).status_code == 401
    assert client.post(f"/api/tokens/{tok['id']}/revoke", headers=bearer(admin_token)).status_code == 200
    assert audit_actions().count("token.revoked") == 1
    assert client.post("/api/tokens/9999/revoke", headers=bearer(admin_token)).status_code == 404
    r = client.get("/api/users/9999/tokens", headers=bearer(admin_token))
    assert r.status_code == 404 and error_code(r) == "user_not_found"


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/users"),
        ("post", "/api/users/{id}/disable"),
        ("post", "/api/users/{id}/enable"),
        ("delete", "/api/users/{id}"),
        ("get", "/api/users/{id}/tokens"),
    ],
)
def test_viewer_tokens_get_403_and_change_nothing(client, cast, viewer_token, method, path):
    r = getattr(client, method)(path.format(id=cast.admin.id), headers=bearer(viewer_token))
    assert r.status_code == 403 and error_code(r) == "forbidden"
    assert _user("admin").is_active


def test_hostile_user_and_token_names_are_escaped_on_the_page(as_admin, cast):
    hostile = _add('<img src=x onerror="alert(1)">')
    ApiToken.issue(hostile, "<script>alert(2)</script>")
    db.session.commit()
    html = as_admin.get("/settings/users").get_data(as_text=True)
    assert "<img src=x" not in html and "<script>alert" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html and "&lt;script&gt;alert(2)" in html


def test_two_admins_disabling_each_other_at_once_leave_one_enabled(app, cast):
    """Real server threads and a real database: the last-admin check cannot be raced."""
    import threading

    import requests

    from tests.support.live import LiveServer

    second = User.create("second-admin", "second-pass-123", "admin")
    _, first_token = ApiToken.issue(cast.admin, "a")
    _, second_token = ApiToken.issue(second, "b")
    db.session.commit()
    first_id, second_id = cast.admin.id, second.id
    with LiveServer(app) as live:
        for _ in range(5):
            barrier = threading.Barrier(2)
            answers = {}

            def disable(token, victim, barrier=barrier, answers=answers):
                barrier.wait()
                r = requests.post(f"{live.admin_url}/api/users/{victim}/disable", headers=bearer(token), timeout=20)
                answers[victim] = r.status_code

            threads = [
                threading.Thread(target=disable, args=(first_token, second_id)),
                threading.Thread(target=disable, args=(second_token, first_id)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            db.session.remove()
            enabled = [u for u in (db.session.get(User, first_id), db.session.get(User, second_id)) if u.is_active]
            assert len(enabled) == 1, answers
            # the loser was refused (409) or had already lost its token (401), never a 500
            assert sorted(answers.values()) in ([200, 401], [200, 409]), answers
            enabled_user = enabled[0]
            other = db.session.get(User, second_id if enabled_user.id == first_id else first_id)
            other.enable("test")
            db.session.commit()
