"""The fleet rolling-update page: start, watch (HTMX polling partial), cancel, history.

Every user sees the page (viewers read-only, without the start and cancel controls).
"""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask_login import login_required

from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..errors import Refusal, renders_refusal
from ..htmx import is_htmx, redirect_or_hx
from ..updates import fleet
from . import bp


def _context(message: str | None = None) -> dict:
    history = fleet.history()
    current = fleet.running() or (history[0] if history else None)
    plan = fleet.plan()
    return {
        "current": current,
        "current_dict": current.to_dict() if current is not None else None,
        "waiting": fleet.offline_wait(current) if current is not None else None,
        # What Start would take: the plan's hosts; the behind hosts it leaves out are named apart.
        "behind": [p.host for p in plan.hosts],
        "left_out_behind": [lo for lo in plan.left_out if lo.reason in ("cannot_update", "offline")],
        "history": history,
        "message": message,
        "button": EmptyForm(),
    }


def _refused(refusal: Refusal):
    """Show a refused start or cancel: in place for HTMX, as a flash message otherwise."""
    if refusal.status == 404:
        return None  # the error page
    if is_htmx():
        return render_template("fleet/_status.html", **_context(message=refusal.message)), refusal.status
    flash(refusal.message, "error")
    return redirect(url_for("main.fleet_update"), code=303)


@bp.route("/settings/fleet-update")
@login_required
def fleet_update():
    return render_template("fleet/page.html", **_context())


@bp.route("/settings/fleet-update/status")
@login_required
def fleet_status():
    if is_htmx():
        return render_template("fleet/_status.html", oob_history=True, **_context())
    return render_template("fleet/page.html", **_context())


@bp.route("/settings/fleet-update/start", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_start():
    fu = fleet.start(actor_name())
    flash(f"Fleet update {fu.id} to {fu.target_version} started over {len(fu.hosts)} host(s).", "info")
    return redirect_or_hx(url_for("main.fleet_update"))


@bp.route("/settings/fleet-update/<int:fleet_id>/cancel", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_cancel(fleet_id: int):
    fleet.cancel(fleet_id, actor_name())
    flash(f"Fleet update {fleet_id} cancelled; the host being updated finishes its own job.", "info")
    return redirect_or_hx(url_for("main.fleet_update"))
