"""Login, logout, and the admin's API tokens page."""

from __future__ import annotations

from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from ..extensions import db
from ..htmx import redirect_or_hx
from ..models import ApiToken, AuditEvent
from ..timeutil import utcnow
from . import admin_required, bp, throttle
from .forms import EmptyForm, LoginForm, TokenForm


def _safe_next(target: str | None) -> str:
    """Only follow same-site relative paths after login (no open redirect)."""
    if not target:
        return url_for("main.dashboard")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("main.dashboard")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(_safe_next(request.args.get("next")))
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    error = None
    status = 200
    if form.validate_on_submit():
        result = throttle.attempt(form.username.data.strip(), form.password.data, request.remote_addr or "")
        if result.user is not None:
            login_user(result.user)
            return redirect(_safe_next(form.next.data))
        error = result.error
    elif request.method == "POST":
        status = 400
    return render_template("auth/login.html", form=form, error=error), status


@bp.route("/logout", methods=["POST"])
@login_required
def logout():
    AuditEvent.record(current_user.username, "auth.logout", current_user.username)
    db.session.commit()
    logout_user()
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"))


def _own_token_or_404(token_id: int) -> ApiToken:
    tok = db.session.get(ApiToken, token_id)
    if tok is None or tok.user_id != current_user.id:
        abort(404, "No such API token.")
    return tok


@bp.route("/settings/tokens", methods=["GET", "POST"])
@admin_required
def tokens():
    form = TokenForm()
    plain = None
    if form.validate_on_submit():
        _, plain = ApiToken.issue(current_user, (form.name.data or "").strip(), actor=current_user.username)
        db.session.commit()
        form = TokenForm(formdata=None)
    rows = db.session.scalars(
        sa.select(ApiToken).where(ApiToken.user_id == current_user.id).order_by(ApiToken.id.desc())
    ).all()
    return render_template("settings/tokens.html", form=form, tokens=rows, plain=plain, button=EmptyForm())


@bp.route("/settings/tokens/<int:token_id>/revoke", methods=["POST"])
@admin_required
def revoke_token(token_id: int):
    tok = _own_token_or_404(token_id)
    if tok.revoked_at is None:
        tok.revoked_at = utcnow()
        AuditEvent.record(current_user.username, "token.revoked", f"token {tok.prefix}", token_id=tok.id)
        db.session.commit()
        flash(f"Token {tok.prefix}… revoked.", "info")
    return redirect_or_hx(url_for("auth.tokens"))
