"""The notifications settings page: where alerts and rollouts are sent, and how the last delivery went."""

from __future__ import annotations

from flask import current_app, flash, redirect, render_template, url_for
from flask_login import login_required

from .. import notify
from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..errors import Refusal, renders_refusal
from ..htmx import redirect_or_hx
from ..runtime import runtime
from . import bp


def _refused(refusal: Refusal):
    flash(refusal.message, "error")
    return redirect(url_for("main.notifications"), code=303)


@bp.route("/settings/notifications")
@login_required
def notifications():
    notifier = runtime().notifier
    return render_template(
        "settings/notifications.html",
        states=notifier.status(),
        notifier=notifier,
        public_url=current_app.config.get("PUBLIC_URL"),
        button=EmptyForm(),
    )


@bp.route("/settings/notifications/test", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def notifications_test():
    n = notify.send_test(actor_name())
    flash(f"Test notification queued for {n} destination(s); reload to see how it went.", "info")
    return redirect_or_hx(url_for("main.notifications"))
