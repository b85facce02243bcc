"""JSON endpoints: parse, call the model or capability, serialize."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Response, abort, current_app, jsonify, request
from flask_login import current_user

from .. import hosts
from .. import labels as host_labels
from ..auth import actor_name, admin_required
from ..errors import error_response
from ..extensions import db
from ..inputs import MAX_ID, bounded_int, has_control_characters
from ..models import Alert, ApiToken, AuditEvent, FleetUpdate, Job, User
from ..runtime import runtime
from ..updates import dispatch, fleet, report, revert, schedule
from . import bp

PING_TIMEOUT_S = 5.0
AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX_LIMIT = 500
JOB_ID_MAX_CHARS = 36  # a UUID


def _version() -> str:
    return current_app.config["SERVER_VERSION"]


def _json_body() -> dict:
    """The request's JSON object; 400 ``invalid_json`` for anything else (an empty body is ``{}``)."""
    if not request.get_data(cache=True):
        return {}
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        abort(error_response(400, "invalid_json", "the request body must be a JSON object"))
    return data


def _int_arg(name: str, default: int | None, lo: int, hi: int = MAX_ID) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    n = bounded_int(raw, lo, hi)
    if n is None:
        abort(error_response(400, "invalid_parameter", f"{name} must be a whole number from {lo} to {hi}"))
    return n


def _enrolment_json(enrolment: hosts.Enrolment):
    """A host with its new agent token and install command (the only time the token is shown)."""
    return jsonify(
        {
            "host": enrolment.host.to_dict(_version()),
            "token": enrolment.token,
            "install_command": enrolment.install_command,
            "warning": enrolment.no_release_key_warning,
        }
    )


@bp.get("/version")
def version():
    return jsonify({"version": _version()})


@bp.get("/hosts")
def host_list():
    updates = request.args.get("updates")
    if updates not in (None, "behind"):
        return error_response(400, "invalid_parameter", "updates only accepts 'behind'")
    wanted = host_labels.parse_pairs(request.args.getlist("label"), "the label filter")
    return jsonify({"hosts": [h.to_dict(_version()) for h in hosts.list_hosts(updates, wanted)]})


@bp.post("/hosts")
@admin_required
def host_create():
    body = _json_body()
    return _enrolment_json(hosts.enrol(body.get("name"), actor_name(), request.host, body.get("labels"))), 201


@bp.get("/hosts/<int:host_id>")
def host_get(host_id: int):
    host = hosts.get(host_id)
    job = hosts.latest_update_job(host.id)
    return jsonify({"host": host.to_dict(_version()), "latest_update_job": job.to_dict() if job else None})


def _labels_body():
    body = _json_body()
    if "labels" not in body:
        abort(error_response(400, "invalid_labels", 'the body must be {"labels": {"key": "value", ...}}'))
    return body["labels"]


@bp.put("/hosts/<int:host_id>/labels")
@admin_required
def host_labels_put(host_id: int):
    """Replace the host's labels with the body's ``labels``."""
    host = hosts.get(host_id)
    hosts.set_labels(host, _labels_body(), actor_name())
    return jsonify({"host": host.to_dict(_version())})


@bp.patch("/hosts/<int:host_id>/labels")
@admin_required
def host_labels_patch(host_id: int):
    """Merge the body's ``labels`` into the host's (JSON merge patch: a null value removes a key)."""
    host = hosts.get(host_id)
    hosts.patch_labels(host, _labels_body(), actor_name())
    return jsonify({"host": host.to_dict(_version())})


@bp.delete("/hosts/<int:host_id>")
@admin_required
def host_delete(host_id: int):
    host = hosts.get(host_id)
    hosts.delete(host, actor_name())
    return "", 204


@bp.post("/hosts/<int:host_id>/revoke")
@admin_required
def host_revoke(host_id: int):
    host = hosts.get(host_id)
    if host.revoked_at is None:
        hosts.revoke(host, actor_name())
    return jsonify({"host": host.to_dict(_version())})


@bp.post("/hosts/<int:host_id>/token")
@admin_required
def host_token(host_id: int):
    return _enrolment_json(hosts.reissue_token(hosts.get(host_id), actor_name(), request.host))


@bp.post("/hosts/<int:host_id>/ping")
@admin_required
def host_ping(host_id: int):
    host = hosts.get(host_id)
    held, rtt = hosts.ping(host, float(current_app.config.get("PING_TIMEOUT", PING_TIMEOUT_S)))
    if not held:
        return error_response(409, "host_offline", f"host {host.name} is not connected")
    if rtt is None:
        return error_response(504, "agent_timeout", f"host {host_id} did not answer the ping in time")
    return jsonify({"rtt_ms": round(rtt * 1000.0, 3)})


@bp.post("/hosts/<int:host_id>/update")
@admin_required
def host_update(host_id: int):
    body = _json_body()
    allow_downgrade = body.get("allow_downgrade", False)
    if not isinstance(allow_downgrade, bool):
        return error_response(400, "invalid_field", "allow_downgrade must be true or false")
    job = dispatch.dispatch_update(host_id, actor_name(), allow_downgrade=allow_downgrade)
    return jsonify({"job": job.to_dict()}), 202


@bp.get("/hosts/<int:host_id>/jobs")
def host_jobs(host_id: int):
    host = hosts.get(host_id)
    limit = _int_arg("limit", 50, 1, 500)
    return jsonify({"jobs": [j.to_dict() for j in hosts.jobs_for(host.id, limit)]})


@bp.get("/jobs/<job_id>")
def job_get(job_id: str):
    job = db.session.get(Job, job_id) if len(job_id) <= JOB_ID_MAX_CHARS and "\x00" not in job_id else None
    if job is None:
        return error_response(404, "job_not_found", f"no job with id {job_id}")
    return jsonify({"job": job.to_dict()})


@bp.get("/alerts")
def alert_list():
    status = request.args.get("status", "open")
    if status not in ("open", "resolved", "all"):
        return error_response(400, "invalid_parameter", "status must be open, resolved or all")
    return jsonify({"alerts": [a.to_dict() for a in Alert.listing(status)]})


@bp.post("/alerts/<int:alert_id>/ack")
@admin_required
def alert_ack(alert_id: int):
    alert = Alert.get(alert_id)
    alert.acknowledge(actor_name())
    db.session.commit()
    return jsonify({"alert": alert.to_dict()})


@bp.get("/notifications")
def notifications():
    """Where notifications go and how the last delivery to each went (no secrets: viewers read it)."""
    return jsonify({"notifications": runtime().notifier.to_dict()})


@bp.get("/audit")
def audit():
    limit = _int_arg("limit", AUDIT_DEFAULT_LIMIT, 1, AUDIT_MAX_LIMIT)
    before_id = _int_arg("before_id", None, 1)
    events, next_before = AuditEvent.page(limit, before_id)
    return jsonify({"events": [e.to_dict() for e in events], "next_before_id": next_before})


@bp.post("/tokens")
@admin_required
def token_create():
    body = _json_body()
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 100 or has_control_characters(name):
        return error_response(
            400, "invalid_name", "name must be a string of at most 100 characters, without control characters"
        )
    tok, plain = ApiToken.issue(current_user, name.strip(), actor=current_user.username)
    db.session.commit()
    return jsonify({"token": plain, "api_token": tok.to_dict()}), 201


# --- accounts: admins only (the list of names is not for viewers); a Refusal, such as the last
# admin, is answered by the app's handler -----------------------------------------------------


def _user_or_404(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        abort(error_response(404, "user_not_found", f"no user with id {user_id}"))
    return user


@bp.get("/users")
@admin_required
def user_list():
    users = db.session.scalars(sa.select(User).order_by(User.username)).all()
    return jsonify({"users": [u.to_dict() for u in users]})


@bp.post("/users/<int:user_id>/disable")
@admin_required
def user_disable(user_id: int):
    user = _user_or_404(user_id)
    user.disable(actor_name())
    db.session.commit()
    return jsonify({"user": user.to_dict()})


@bp.post("/users/<int:user_id>/enable")
@admin_required
def user_enable(user_id: int):
    user = _user_or_404(user_id)
    user.enable(actor_name())
    db.session.commit()
    return jsonify({"user": user.to_dict()})


@bp.delete("/users/<int:user_id>")
@admin_required
def user_delete(user_id: int):
    user = _user_or_404(user_id)
    user.remove(actor_name())
    db.session.commit()
    return "", 204


@bp.get("/users/<int:user_id>/tokens")
@admin_required
def user_tokens(user_id: int):
    user = _user_or_404(user_id)
    rows = db.session.scalars(sa.select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc()))
    return jsonify({"api_tokens": [t.to_dict() for t in rows]})


@bp.post("/tokens/<int:token_id>/revoke")
@admin_required
def token_revoke(token_id: int):
    tok = db.session.get(ApiToken, token_id)
    if tok is None:
        return error_response(404, "token_not_found", f"no API token with id {token_id}")
    tok.revoke(actor_name())
    db.session.commit()
    return jsonify({"api_token": tok.to_dict()})


# --- fleet rolling updates --------------------------------------------------------------------


@bp.post("/fleet/update")
@admin_required
def fleet_start():
    body = _json_body()
    fu = schedule.start_from_body(actor_name(), body)
    return jsonify({"fleet_update": schedule.describe(fu)}), 201


@bp.post("/fleet/plan")
@admin_required
def fleet_plan():
    """What ``POST /fleet/update`` with this body would do now; changes nothing."""
    body = _json_body()
    return jsonify({"plan": fleet.plan_from_body(body).to_dict()})


@bp.get("/fleet-updates")
def fleet_list():
    limit = _int_arg("limit", 20, 1, 200)
    return jsonify({"fleet_updates": [schedule.describe(fu) for fu in fleet.history(limit)]})


@bp.get("/fleet-updates/<int:fleet_id>")
def fleet_get(fleet_id: int):
    fu = db.session.get(FleetUpdate, fleet_id)
    if fu is None:
        return error_response(404, "fleet_update_not_found", f"no fleet update with id {fleet_id}")
    return jsonify({"fleet_update": schedule.describe(fu)})


@bp.get("/fleet-updates/<int:fleet_id>/report")
def fleet_report(fleet_id: int):
    """The run report (docs/updates.md#run-report); partial while the rollout runs."""
    return jsonify({"report": report.build(fleet_id).to_dict()})


@bp.get("/fleet-updates/<int:fleet_id>/report.csv")
def fleet_report_csv(fleet_id: int):
    body = report.build(fleet_id).csv()
    disposition = f'attachment; filename="{report.csv_filename(fleet_id)}"'
    return Response(body, mimetype="text/csv", headers={"Content-Disposition": disposition})


@bp.post("/fleet-updates/<int:fleet_id>/cancel")
@admin_required
def fleet_cancel(fleet_id: int):
    fu = fleet.cancel(fleet_id, actor_name())
    return jsonify({"fleet_update": fu.to_dict()})


@bp.post("/fleet-updates/<int:fleet_id>/pause")
@admin_required
def fleet_pause(fleet_id: int):
    return jsonify({"fleet_update": fleet.pause(fleet_id, actor_name()).to_dict()})


@bp.post("/fleet-updates/<int:fleet_id>/resume")
@admin_required
def fleet_resume(fleet_id: int):
    return jsonify({"fleet_update": fleet.resume(fleet_id, actor_name()).to_dict()})


@bp.post("/fleet-updates/<int:fleet_id>/retry")
@admin_required
def fleet_retry(fleet_id: int):
    """A new rollout of the failed and skipped hosts of this one, with the same strategy."""
    return jsonify({"fleet_update": fleet.retry(fleet_id, actor_name()).to_dict()}), 201


@bp.post("/fleet-updates/<int:fleet_id>/revert")
@admin_required
def fleet_revert(fleet_id: int):
    """A new rollout taking the hosts this one updated back to the version each ran before."""
    return jsonify({"fleet_update": revert.start(fleet_id, actor_name()).to_dict()}), 201


@bp.post("/fleet-updates/<int:fleet_id>/hosts/<int:host_id>/skip")
@admin_required
def fleet_skip_host(fleet_id: int, host_id: int):
    return jsonify({"fleet_update": fleet.skip_host(fleet_id, host_id, actor_name()).to_dict()})
