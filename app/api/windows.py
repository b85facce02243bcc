"""JSON endpoints for maintenance windows: everyone reads, admins create, change and delete."""

from __future__ import annotations

from flask import jsonify

from ..auth import actor_name, admin_required
from ..updates import maintenance
from . import bp
from .views import _json_body


@bp.get("/maintenance-windows")
def window_list():
    return jsonify({"maintenance_windows": [maintenance.to_dict(w) for w in maintenance.list_windows()]})


@bp.post("/maintenance-windows")
@admin_required
def window_create():
    row = maintenance.create(actor_name(), _json_body())
    return jsonify({"maintenance_window": maintenance.to_dict(row)}), 201


@bp.get("/maintenance-windows/<int:window_id>")
def window_get(window_id: int):
    return jsonify({"maintenance_window": maintenance.to_dict(maintenance.get(window_id))})


@bp.patch("/maintenance-windows/<int:window_id>")
@admin_required
def window_update(window_id: int):
    row = maintenance.update(maintenance.get(window_id), actor_name(), _json_body())
    return jsonify({"maintenance_window": maintenance.to_dict(row)})


@bp.delete("/maintenance-windows/<int:window_id>")
@admin_required
def window_delete(window_id: int):
    maintenance.delete(maintenance.get(window_id), actor_name())
    return "", 204
