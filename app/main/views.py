"""Page views: parse the request, call the host/update capability, render a page or a fragment.

A refused operation raises :class:`~app.errors.Refusal`; the app's handler rolls back and calls
the renderer a view names with ``@renders_refusal`` (the form again, or the HTMX fragment with
the message, or a flash message and a redirect). No view catches a refusal itself.
"""

from __future__ import annotations

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import hosts
from .. import labels as host_labels
from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..errors import Refusal, renders_refusal
from ..extensions import db
from ..htmx import is_htmx, redirect_or_hx
from ..inputs import bounded_int
from ..models import Alert, AuditEvent, Host
from ..updates import dispatch
from . import bp
from .forms import AddHostForm, LabelsForm

AUDIT_PAGE_SIZE = 50


def _update_status_context(host: Host, message: str | None = None, message_kind: str = "error") -> dict:
    return {
        "host": host,
        "job": hosts.latest_update_job(host.id),
        "jobs": hosts.jobs_for(host.id),
        "refusal": dispatch.precheck(host) if current_user.is_admin else None,
        "message": message,
        "message_kind": message_kind,
        "button": EmptyForm(),
    }


@bp.route("/")
@login_required
def dashboard():
    return render_template("main/dashboard.html", counts=hosts.dashboard_counts(), alerts=Alert.listing("open")[:5])


@bp.route("/hosts")
@login_required
def host_list():
    updates = request.args.get("updates")
    if updates not in (None, "", "behind"):
        abort(400, "The updates filter only knows 'behind'.")
    filters = [f.strip() for f in request.args.getlist("label") if f.strip()]
    ctx = {"updates": updates, "label_filters": filters}
    try:
        wanted = host_labels.parse_pairs(filters, "the label filter")
    except Refusal as refusal:  # a typed-in filter: say what is wrong with it on the page itself
        return render_template("hosts/list.html", hosts=[], filter_error=refusal.message, **ctx), 400
    ctx["label_filters"] = [f"{k}={v}" for k, v in wanted.items()]
    return render_template("hosts/list.html", hosts=hosts.list_hosts(updates or None, wanted), **ctx)


def _enrol_refused(refusal: Refusal):
    """Show the form again with the refusal under its field (the labels, or the name)."""
    form = AddHostForm()
    form.validate()
    field = form.labels if refusal.code == "invalid_labels" else form.name
    field.errors = [*field.errors, refusal.message]
    return render_template("hosts/new.html", form=form), refusal.status


@bp.route("/hosts/new", methods=["GET", "POST"])
@renders_refusal(_enrol_refused)
@admin_required
def host_new():
    form = AddHostForm()
    if form.validate_on_submit():
        labels = host_labels.parse_text(form.labels.data or "")
        enrolment = hosts.enrol(form.name.data.strip(), actor_name(), request.host, labels)
        # Rendered, not redirected: the agent token exists only in this response.
        return render_template("hosts/enrolled.html", host=enrolment.host, enrolment=enrolment), 201
    status = 400 if request.method == "POST" else 200
    return render_template("hosts/new.html", form=form), status


def _labels_form(host: Host) -> LabelsForm:
    return LabelsForm(formdata=None, labels=host_labels.format_pairs(host.labels))


@bp.route("/hosts/<int:host_id>")
@login_required
def host_detail(host_id: int):
    host = hosts.get(host_id)
    return render_template("hosts/detail.html", labels_form=_labels_form(host), **_update_status_context(host))


def _labels_refused(refusal: Refusal):
    """The host page again, the labels as typed and the refusal under them."""
    if refusal.code == "host_not_found":
        return None
    host = hosts.get(request.view_args["host_id"])
    form = LabelsForm()
    form.labels.errors = [refusal.message]
    return render_template("hosts/detail.html", labels_form=form, **_update_status_context(host)), refusal.status


@bp.route("/hosts/<int:host_id>/labels", methods=["POST"])
@renders_refusal(_labels_refused)
@admin_required
def host_labels_edit(host_id: int):
    host = hosts.get(host_id)
    form = LabelsForm()
    if not form.validate_on_submit():
        message = "; ".join(form.labels.errors or [e for errs in form.errors.values() for e in errs])
        raise Refusal(400, "invalid_labels", message or "the form could not be read; reload the page")
    changed = hosts.set_labels(host, host_labels.parse_text(form.labels.data or ""), actor_name())
    flash(f"Labels of {host.name} saved." if changed else f"Labels of {host.name} unchanged.", "info")
    return redirect_or_hx(url_for("main.host_detail", host_id=host_id))


@bp.route("/hosts/<int:host_id>/update-status")
@login_required
def update_status(host_id: int):
    host = hosts.get(host_id)
    ctx = _update_status_context(host)
    if is_htmx():
        return render_template("hosts/_update_status.html", oob_history=True, **ctx)
    return render_template("hosts/detail.html", labels_form=_labels_form(host), **ctx)


def _update_refused(refusal: Refusal):
    """In place for HTMX (the status fragment with the message), as a flash message otherwise."""
    if refusal.code == "host_not_found":
        return None  # no page to show it on: the error page
    host_id = request.view_args["host_id"]
    if is_htmx():
        ctx = _update_status_context(hosts.get(host_id), message=refusal.message)
        return render_template("hosts/_update_status.html", **ctx), refusal.status
    flash(refusal.message, "error")
    return redirect(url_for("main.host_detail", host_id=host_id), code=303)


@bp.route("/hosts/<int:host_id>/update", methods=["POST"])
@renders_refusal(_update_refused)
@admin_required
def host_update(host_id: int):
    host = hosts.get(host_id)
    job = dispatch.dispatch_update(host.id, actor_name())
    if job.status == "running":
        message, kind = f"Update of {host.name} to {job.target_version} dispatched.", "info"
    else:
        message, kind = f"Update of {host.name} failed: {job.error}", "error"
    if is_htmx():
        # The panel itself, polling: the message goes with the next poll instead of staying on the page.
        ctx = _update_status_context(host, message=message, message_kind=kind)
        return render_template("hosts/_update_status.html", oob_history=True, **ctx)
    flash(message, kind)
    return redirect(url_for("main.host_detail", host_id=host_id), code=303)


@bp.route("/hosts/<int:host_id>/token", methods=["POST"])
@admin_required
def host_token(host_id: int):
    """Replace the agent token (lifting a revocation); the new token is in this response only.

    The same full page for a plain form and for htmx (which swaps it into the body).
    """
    enrolment = hosts.reissue_token(hosts.get(host_id), actor_name(), request.host)
    return render_template("hosts/enrolled.html", host=enrolment.host, enrolment=enrolment, reissued=True)


@bp.route("/hosts/<int:host_id>/revoke", methods=["POST"])
@admin_required
def host_revoke(host_id: int):
    host = hosts.get(host_id)
    if host.revoked_at is None:
        hosts.revoke(host, actor_name())
        flash(f"The agent token of {host.name} is revoked; its connection was closed.", "info")
    return redirect_or_hx(url_for("main.host_detail", host_id=host_id))


@bp.route("/hosts/<int:host_id>/delete", methods=["POST"])
@admin_required
def host_delete(host_id: int):
    host = hosts.get(host_id)
    name = host.name
    hosts.delete(host, actor_name())
    flash(f"Host {name} deleted.", "info")
    return redirect_or_hx(url_for("main.host_list"))


@bp.route("/alerts")
@login_required
def alert_list():
    return render_template(
        "main/alerts.html", open_alerts=Alert.listing("open"), resolved=Alert.listing("resolved"), button=EmptyForm()
    )


def _ack_refused(refusal: Refusal):
    if refusal.code == "alert_not_found":
        return None
    flash(refusal.message, "error")
    return redirect_or_hx(url_for("main.alert_list"))


@bp.route("/alerts/<int:alert_id>/ack", methods=["POST"])
@renders_refusal(_ack_refused)
@admin_required
def alert_ack(alert_id: int):
    alert = Alert.get(alert_id)
    if alert.acknowledge(actor_name()):
        db.session.commit()
        flash(f"Alert {alert.id} acknowledged.", "info")
    return redirect_or_hx(url_for("main.alert_list"))


@bp.route("/audit")
@login_required
def audit():
    before_id = bounded_int(request.args.get("before_id"), 1)  # anything else: the first page
    events, next_before = AuditEvent.page(AUDIT_PAGE_SIZE, before_id)
    return render_template("main/audit.html", events=events, next_before=next_before, before_id=before_id)


@bp.app_context_processor
def _inject_forms():
    return {"logout_form": EmptyForm, "app_name": current_app.config.get("APP_NAME", "restic-manager")}
