"""Login, logout, the admin's API tokens page, and the users page."""

from __future__ import annotations

from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from ..errors import Refusal, renders_refusal
from ..extensions import db
from ..htmx import redirect_or_hx
from ..inputs import has_control_characters
from ..models import ApiToken, AuditEvent, User
from . import actor_name, admin_required, bp, throttle
from .forms import EmptyForm, LoginForm, TokenForm


def _safe_next(target: str | None) -> str:
    """Only follow same-site relative paths after login (no open redirect)."""
    if not target:
        return url_for("main.dashboard")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("main.dashboard")
    if has_control_characters(target):  # a CR or LF cannot go into the Location header (was a 500)
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
    """Log out, ending every session of this user (a copied cookie dies with this one)."""
    current_user.end_sessions()
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
    if tok.revoke(current_user.username):
        db.session.commit()
        flash(f"Token {tok.prefix}… revoked.", "info")
    return redirect_or_hx(url_for("auth.tokens"))


# --- users (admins only; viewers get 403: the list of accounts is not theirs to see) -----------


def _user_or_404(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        abort(404, f"There is no user with id {user_id}.")
    return user


def _back_to_users():
    return redirect_or_hx(url_for("auth.users"))


def _account_refused(refusal: Refusal):
    """A refused account change (the last admin): back to the users page, with the reason."""
    flash(refusal.message, "error")
    return _back_to_users()


def _account_change(operation, *args, done: str):
    """Run a user operation, commit and flash; a :class:`Refusal` goes to ``_account_refused``."""
    operation(*args)
    db.session.commit()
    flash(done, "info")
    return _back_to_users()


@bp.route("/settings/users")
@admin_required
def users():
    rows = db.session.scalars(sa.select(User).order_by(User.username)).all()
    tokens = db.session.scalars(
        sa.select(ApiToken).join(User).where(ApiToken.revoked_at.is_(None)).order_by(User.username, ApiToken.id)
    ).all()
    return render_template("settings/users.html", users=rows, tokens=tokens, button=EmptyForm())


@bp.route("/settings/users/<int:user_id>/disable", methods=["POST"])
@renders_refusal(_account_refused)
@admin_required
def user_disable(user_id: int):
    user = _user_or_404(user_id)
    return _account_change(user.disable, actor_name(), done=f"{user.username} is disabled; their sessions ended.")


@bp.route("/settings/users/<int:user_id>/enable", methods=["POST"])
@renders_refusal(_account_refused)
@admin_required
def user_enable(user_id: int):
    user = _user_or_404(user_id)
    return _account_change(user.enable, actor_name(), done=f"{user.username} is enabled.")


@bp.route("/settings/users/<int:user_id>/delete", methods=["POST"])
@renders_refusal(_account_refused)
@admin_required
def user_delete(user_id: int):
    user = _user_or_404(user_id)
    return _account_change(user.remove, actor_name(), done=f"{user.username} and their API tokens are deleted.")


@bp.route("/settings/users/tokens/<int:token_id>/revoke", methods=["POST"])
@renders_refusal(_account_refused)
@admin_required
def user_token_revoke(token_id: int):
    tok = db.session.get(ApiToken, token_id)
    if tok is None:
        abort(404, "No such API token.")
    return _account_change(tok.revoke, actor_name(), done=f"Token {tok.prefix}… of {tok.user.username} revoked.")
