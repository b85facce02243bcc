"""Accounts: login/logout pages, the session and API-token loaders, roles, API tokens page."""

from __future__ import annotations

import functools
import threading

import sqlalchemy as sa
from flask import Blueprint, Flask, abort, current_app, g, redirect, request, url_for
from flask_login import current_user

from ..errors import error_response, wants_json
from ..extensions import db, login
from ..htmx import hx_redirect, is_htmx
from ..models import ApiToken, AuditEvent, User
from ..timeutil import utcnow

bp = Blueprint("auth", __name__)

#: last_used_at is bookkeeping, not a log: write it at most this often per token.
TOKEN_TOUCH_S = 60.0
#: One ``auth.token_used`` audit row per token per this many seconds, not one per request.
TOKEN_AUDIT_S = 3600.0


def is_api_request() -> bool:
    """``/api`` and ``/metrics``: bearer API tokens authenticate them, and they answer in JSON."""
    return request.path in ("/api", "/metrics") or request.path.startswith("/api/")


def actor_name() -> str:
    """The name audit rows and jobs record for the current user."""
    if current_user.is_authenticated:
        via = g.get("api_token_prefix")
        return f"{current_user.username} (token {via})" if via else current_user.username
    return "anonymous"


def admin_required(view):
    """Allow admins; 401/login redirect for anonymous users, 403 for viewers (JSON on /api)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not current_user.is_authenticated:
            return login.unauthorized()
        if not current_user.is_admin:
            if wants_json():
                return error_response(403, "forbidden", "this action needs the admin role")
            abort(403, "This action needs the admin role.")
        return view(*args, **kwargs)

    return wrapper


class _TokenAuditMemo:
    """Remember when each token was last audited, so token use is logged once per hour.

    In memory on purpose: a restart at worst writes one extra row per token.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}

    def due(self, token_id: int, now: float) -> bool:
        with self._lock:
            last = self._last.get(token_id)
            if last is not None and now - last < TOKEN_AUDIT_S:
                return False
            self._last[token_id] = now
            return True


def _load_user_from_request(req) -> User | None:
    """Authenticate ``Authorization: Bearer <api token>``, on /api only (pages use the session)."""
    if not is_api_request():
        return None
    scheme, _, value = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    tok = ApiToken.lookup(value.strip())
    if tok is None:
        return None
    user = tok.user
    if user is None or not user.is_active:
        return None  # a disabled account's tokens answer 401 like unknown ones
    g.api_token_prefix = tok.prefix
    now = utcnow()
    if tok.last_used_at is None or (now - tok.last_used_at).total_seconds() >= TOKEN_TOUCH_S:
        db.session.execute(sa.update(ApiToken).where(ApiToken.id == tok.id).values(last_used_at=now))
        if current_app.extensions["rm.token_audit"].due(tok.id, now.timestamp()):
            AuditEvent.record(user.username, "auth.token_used", f"token {tok.prefix}", token_id=tok.id)
        db.session.commit()
    return user


def _unauthorized():
    if is_api_request():
        return error_response(401, "unauthorized", "log in or send Authorization: Bearer <api token>")
    if is_htmx():
        # A redirect would be followed by htmx and swapped into the page; send the browser instead.
        return hx_redirect(url_for("auth.login", next=request.full_path.rstrip("?")), status=401)
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def init_login(app: Flask) -> None:
    login.session_protection = "strong"
    login.login_view = "auth.login"
    login.user_loader(User.load)
    login.request_loader(_load_user_from_request)
    login.unauthorized_handler(_unauthorized)
    app.extensions["rm.token_audit"] = _TokenAuditMemo()


from . import throttle, views  # noqa: E402,F401  (routes register on bp)
