"""The fleet rolling-update page: start, watch (HTMX polling partial), cancel, history."""

from __future__ import annotations

from flask import abort, flash, redirect, render_template, url_for

from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..extensions import db
from ..models import FleetUpdate
from . import bp, hosts
from .views import _hx_redirect, is_htmx


def _context(message: str | None = None) -> dict:
    from ..updates import fleet

    history = hosts.fleet_updates()
    current = fleet.running() or (history[0] if history else None)
    return {
        "current": current,
        "current_dict": fleet.to_dict(current) if current is not None else None,
        "behind": fleet.behind_hosts(),
        "history": [fleet.to_dict(fu) for fu in history],
        "message": message,
        "button": EmptyForm(),
    }


@bp.route("/settings/fleet-update")
@admin_required
def fleet_update():
    return render_template("fleet/page.html", **_context())


@bp.route("/settings/fleet-update/status")
@admin_required
def fleet_status():
    if is_htmx():
        return render_template("fleet/_status.html", oob_history=True, **_context())
    return render_template("fleet/page.html", **_context())


@bp.route("/settings/fleet-update/start", methods=["POST"])
@admin_required
def fleet_start():
    from ..updates import fleet

    try:
        fu = fleet.start(actor_name())
    except fleet.FleetRefusal as refusal:
        return _refused(refusal)
    flash(f"Fleet update {fu.id} to {fu.target_version} started over {len(fu.hosts)} host(s).", "info")
    return _back_to_page()


@bp.route("/settings/fleet-update/<int:fleet_id>/cancel", methods=["POST"])
@admin_required
def fleet_cancel(fleet_id: int):
    from ..updates import fleet

    if db.session.get(FleetUpdate, fleet_id) is None:
        abort(404, f"There is no fleet update {fleet_id}.")
    try:
        fleet.cancel(fleet_id, actor_name())
    except fleet.FleetRefusal as refusal:
        return _refused(refusal)
    flash(f"Fleet update {fleet_id} cancelled; the host being updated finishes its own job.", "info")
    return _back_to_page()


def _refused(refusal):
    """Show a refused start or cancel: in place for HTMX, as a flash message otherwise."""
    db.session.rollback()
    if is_htmx():
        return render_template("fleet/_status.html", **_context(message=refusal.message)), refusal.status
    flash(refusal.message, "error")
    return redirect(url_for("main.fleet_update"), code=303)


def _back_to_page():
    target = url_for("main.fleet_update")
    return _hx_redirect(target) if is_htmx() else redirect(target, code=303)
