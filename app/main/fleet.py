"""The fleet rolling-update page: plan (with a strategy), confirm and start, watch (HTMX polling
partial), pause/resume, skip a host, cancel, retry, history.

Every user sees the page (viewers read-only, without the controls).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import flash, redirect, render_template, request, url_for
from flask_login import login_required

from .. import labels as host_labels
from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..errors import Refusal, renders_refusal
from ..extensions import db
from ..htmx import is_htmx, redirect_or_hx
from ..models import Host
from ..updates import fleet, maintenance, report, revert, schedule
from ..updates.selection import Selector
from ..updates.strategy import FIELDS, OFFLINE_POLICIES, Strategy
from . import bp


def _number(raw: str):
    """A form field as the JSON body would carry it: an int or a float when it reads as one."""
    raw = raw.strip()
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _strategy_body(form) -> dict:
    """The strategy fields of the page's form as an API body (blank fields take the defaults)."""
    body: dict = {}
    for name in FIELDS:
        raw = (form.get(name) or "").strip()
        if not raw:
            continue
        body[name] = raw if name in ("max_in_flight", "max_failures", "offline") else _number(raw)
    return body


#: The "Select hosts" inputs and the revert checkbox, as the form names them (texts, kept as typed).
SELECT_INPUTS = ("labels", "os", "arch", "older_than", "exclude_hosts", "revert_on_halt")


def _host_ids_by_name(names: list[str]) -> list[int]:
    """The ids of the hosts named (in that order); 422 ``unknown_hosts`` naming any that do not exist."""
    found = dict(db.session.execute(sa.select(Host.name, Host.id).where(Host.name.in_(names))).all())
    missing = [n for n in names if n not in found]
    if missing:
        raise Refusal(422, "unknown_hosts", f"no host is named {', '.join(missing)}")
    return [found[n] for n in names]


def _form_body(form) -> dict:
    """The page's whole start form as an API body: the strategy, the selector and ``revert_on_halt``.

    Labels are ``key=value`` pairs (commas or spaces between them), excluded hosts are names
    (commas between them) and become ``exclude_host_ids``. Raises the :class:`Refusal` of bad label
    syntax or an unknown host name; :meth:`Selector.from_body` and friends check the rest.
    """
    body = _strategy_body(form)
    labels = (form.get("labels") or "").strip()
    if labels:
        body["labels"] = host_labels.parse_text(labels)
    for name in ("os", "arch", "older_than"):
        raw = (form.get(name) or "").strip()
        if raw:
            body[name] = raw
    names = list(dict.fromkeys(n.strip() for n in (form.get("exclude_hosts") or "").split(",") if n.strip()))
    if names:
        body["exclude_host_ids"] = _host_ids_by_name(names)
    if form.get("revert_on_halt"):
        body["revert_on_halt"] = True
    return body


def _checked_body(form) -> tuple[dict, Refusal | None]:
    """The form's body and the refusal its fields earn (``None`` when they make a plan).

    A form that does not read as a body keeps its strategy, so the plan under the message is the
    default selection's; the Start button is disabled while there is a message.
    """
    try:
        body = _form_body(form)
        Strategy.from_body(body)
        Selector.from_body(body)
        fleet.flag(body, "revert_on_halt")
    except Refusal as refusal:
        return _strategy_body(form), refusal
    return body, None


def _form_values(body: dict, form=None) -> dict:
    """What the inputs show: the submitted values, or the defaults; the selector's texts as typed."""
    d = Strategy().to_dict()
    values = {name: body.get(name, d[name] if d[name] is not None else "") for name in FIELDS}
    form = form or {}
    for name in SELECT_INPUTS:
        values[name] = (form.get(name) or "").strip()
    if values["revert_on_halt"]:
        values["revert_on_halt"] = "1"
    return values


def _context(message: str | None = None, body: dict | None = None, plan_message: str | None = None, form=None) -> dict:
    history = fleet.history()
    current = fleet.running() or next((f for f in history if f.status != "scheduled"), None)
    body = body or {}
    plan = None
    try:
        plan = fleet.plan_from_body(body)
    except Refusal as refusal:
        plan_message = plan_message or refusal.message
        plan = fleet.plan()
    waits = fleet.offline_waits(current) if current is not None else {}
    return {
        "current": current,
        "current_dict": current.to_dict() if current is not None else None,
        "strategy_line": Strategy.of(current).describe(current.total) if current is not None else None,
        "waiting": next(iter(waits.values()), None),
        "waits": waits,
        "window_waits": maintenance.waits(current) if current is not None else [],
        "scheduled": [(fu, schedule.waiting_for(fu)) for fu in schedule.scheduled()],
        "plan": plan,
        "plan_dict": plan.to_dict(),
        "plan_message": plan_message,
        "form_values": _form_values(body, form),
        "offline_policies": OFFLINE_POLICIES,
        # What Start would take: the plan's hosts; the behind hosts it leaves out are named apart.
        "behind": [p.host for p in plan.hosts],
        "left_out_behind": [lo for lo in plan.left_out if lo.reason in ("cannot_update", "offline")],
        "history": history,
        "message": message,
        "button": EmptyForm(),
    }


def _refused(refusal: Refusal):
    """Show a refused action: in place for HTMX, as a flash message otherwise."""
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


@bp.route("/settings/fleet-update/plan", methods=["POST"])
@admin_required
def fleet_plan():
    """The plan for the form's selector and strategy, with the button that starts exactly it (nothing changes)."""
    body, refusal = _checked_body(request.form)
    status = refusal.status if refusal is not None else 200
    ctx = _context(body=body, plan_message=refusal.message if refusal is not None else None, form=request.form)
    if is_htmx():
        return render_template("fleet/_plan.html", **ctx), status
    return render_template("fleet/page.html", **ctx), status


@bp.route("/settings/fleet-update/start", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_start():
    fu = fleet.start_from_body(actor_name(), _form_body(request.form))
    flash(f"Fleet update {fu.id} to {fu.target_version} started over {len(fu.hosts)} host(s).", "info")
    return redirect_or_hx(url_for("main.fleet_update"))


def _act(action, fleet_id: int, done: str):
    """Run a control ``action`` on the rollout, flash what it did, and go back to the page."""
    action(fleet_id, actor_name())
    flash(f"Fleet update {fleet_id} {done}", "info")
    return redirect_or_hx(url_for("main.fleet_update"))


@bp.route("/settings/fleet-update/<int:fleet_id>/cancel", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_cancel(fleet_id: int):
    return _act(fleet.cancel, fleet_id, "cancelled; the hosts being updated finish their own jobs.")


@bp.route("/settings/fleet-update/<int:fleet_id>/pause", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_pause(fleet_id: int):
    return _act(fleet.pause, fleet_id, "paused; the hosts being updated finish their own jobs.")


@bp.route("/settings/fleet-update/<int:fleet_id>/resume", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_resume(fleet_id: int):
    return _act(fleet.resume, fleet_id, "resumed.")


@bp.route("/settings/fleet-update/<int:fleet_id>/retry", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_retry(fleet_id: int):
    fu = fleet.retry(fleet_id, actor_name())
    flash(f"Fleet update {fu.id} retries the failed and skipped hosts of {fleet_id} ({len(fu.hosts)}).", "info")
    return redirect_or_hx(url_for("main.fleet_update"))


@bp.route("/settings/fleet-update/<int:fleet_id>/revert", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_revert(fleet_id: int):
    fu = revert.start(fleet_id, actor_name())
    flash(f"Fleet update {fu.id} takes the {len(fu.hosts)} host(s) rollout {fleet_id} updated back.", "info")
    return redirect_or_hx(url_for("main.fleet_update"))


@bp.route("/settings/fleet-update/<int:fleet_id>/hosts/<int:host_id>/skip", methods=["POST"])
@renders_refusal(_refused)
@admin_required
def fleet_skip_host(fleet_id: int, host_id: int):
    fleet.skip_host(fleet_id, host_id, actor_name())
    return redirect_or_hx(url_for("main.fleet_update"))


@bp.route("/settings/fleet-update/<int:fleet_id>/report")
@login_required
def fleet_report(fleet_id: int):
    """The run report: summary, the SVG timeline, failures by reason, waits, each host's line."""
    rep = report.build(fleet_id)
    return render_template(
        "fleet/report.html",
        rep=rep,
        data=rep.to_dict(),
        timeline=rep.timeline_svg(),
        colours={k: v for k, v in report.COLOURS.items() if k not in ("pending", "waiting")},  # no bar
        wait_colour=report.WAIT_COLOUR,
    )
