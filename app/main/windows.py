"""The maintenance windows page: everyone reads; admins add and delete windows."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from flask_login import login_required
from wtforms import StringField
from wtforms.validators import DataRequired, Length

from .. import labels as host_labels
from ..auth import actor_name, admin_required
from ..auth.forms import EmptyForm
from ..errors import Refusal, renders_refusal
from ..htmx import redirect_or_hx
from ..inputs import TextForm
from ..updates import maintenance
from ..updates.windows import DAY_NAMES, WindowError, parse_day_names
from . import bp


class WindowForm(TextForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=100)], description="e.g. weekend nights")
    start = StringField("Opens", default="02:00", validators=[DataRequired()], description="HH:MM, local time")
    end = StringField("Closes", default="04:00", validators=[DataRequired()], description="HH:MM (24:00 = midnight)")
    timezone = StringField(
        "Time zone", default="UTC", validators=[DataRequired()], description="IANA, e.g. Europe/Berlin"
    )
    labels = StringField("Hosts", description="labels, e.g. site=fra, role=db (empty: every host)")


def _page(form: WindowForm | None = None, message: str | None = None, status: int = 200):
    rows = maintenance.list_windows()
    return (
        render_template(
            "settings/windows.html",
            windows=[maintenance.to_dict(r) for r in rows],
            form=form or WindowForm(formdata=None),
            day_names=DAY_NAMES,
            # The days ticked in the form being shown again (the checkboxes are not a WTForms field).
            days_checked=request.form.getlist("days") if request.method == "POST" else [],
            message=message,
            button=EmptyForm(),
        ),
        status,
    )


def _add_refused(refusal: Refusal):
    return _page(WindowForm(), refusal.message, refusal.status)


def _delete_refused(refusal: Refusal):
    if refusal.status == 404:
        return None
    flash(refusal.message, "error")
    return redirect(url_for("main.windows"), code=303)


@bp.route("/settings/maintenance-windows")
@login_required
def windows():
    return _page()


@bp.route("/settings/maintenance-windows", methods=["POST"])
@renders_refusal(_add_refused)
@admin_required
def window_add():
    form = WindowForm()
    if not form.validate_on_submit():
        return _page(form, status=400)
    try:
        fields = {
            "name": form.name.data,
            "days": parse_day_names(request.form.getlist("days")),
            "start": (form.start.data or "").strip(),
            "end": (form.end.data or "").strip(),
            "timezone": (form.timezone.data or "").strip(),
            "labels": host_labels.parse_text(form.labels.data),
        }
    except WindowError as e:
        raise Refusal(400, "invalid_window", str(e)) from None
    row = maintenance.create(actor_name(), fields)
    flash(f"Maintenance window {row.name!r} added.", "info")
    return redirect_or_hx(url_for("main.windows"))


@bp.route("/settings/maintenance-windows/<int:window_id>/delete", methods=["POST"])
@renders_refusal(_delete_refused)
@admin_required
def window_delete(window_id: int):
    row = maintenance.get(window_id)
    name = row.name
    maintenance.delete(row, actor_name())
    flash(f"Maintenance window {name!r} deleted.", "info")
    return redirect_or_hx(url_for("main.windows"))
