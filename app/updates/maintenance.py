"""Maintenance windows in the database: create, change, delete (audited), and the rollout's gate.

The calendar arithmetic is :mod:`app.updates.windows` (pure); this module reads and writes the
``maintenance_windows`` rows and answers "may this host be updated now, and if not, which window
does it wait for?" for a rollout with ``respect_windows``. Pages, the API and the CLI all call it.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ..errors import Refusal
from ..extensions import db
from ..models import AuditEvent, FleetUpdate, FleetUpdateHost, Host, MaintenanceWindow
from ..timeutil import isoformat, utcnow
from .windows import Wait, Window, WindowError, format_minutes, gate

FIELDS = ("name", "days", "start", "end", "timezone", "labels")


def list_windows() -> list[MaintenanceWindow]:
    return list(db.session.scalars(sa.select(MaintenanceWindow).order_by(MaintenanceWindow.name)))


def get(window_id: int) -> MaintenanceWindow:
    row = db.session.get(MaintenanceWindow, window_id)
    if row is None:
        raise Refusal(404, "window_not_found", f"no maintenance window with id {window_id}")
    return row


def by_name_or_id(key: str) -> MaintenanceWindow:
    """The window named ``key``, else the one whose id it is (for the CLI)."""
    row = db.session.scalar(sa.select(MaintenanceWindow).where(MaintenanceWindow.name == key))
    if row is None and key.isdigit() and len(key) < 10:
        row = db.session.get(MaintenanceWindow, int(key))
    if row is None:
        raise Refusal(404, "window_not_found", f"no maintenance window {key!r}")
    return row


def _validated(fields: dict) -> Window:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise Refusal(
            400, "invalid_window", f"unknown field(s): {', '.join(unknown)} (a window has {', '.join(FIELDS)})"
        )
    try:
        return Window.parse(**{k: fields.get(k) for k in FIELDS})
    except WindowError as e:
        raise Refusal(400, "invalid_window", str(e)) from None


def _store(row: MaintenanceWindow, w: Window) -> None:
    row.name, row.days, row.labels = w.name, list(w.days), dict(w.labels)
    row.start, row.end, row.timezone = format_minutes(w.start), format_minutes(w.end), w.zone.key


def _flush_unique(name: str) -> None:
    """Write the pending change; a name another request took meanwhile is a 409."""
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()
        raise Refusal(409, "window_exists", f"a maintenance window named {name!r} already exists") from None


def _exists(name: str, but: int | None = None) -> bool:
    q = sa.select(MaintenanceWindow.id).where(MaintenanceWindow.name == name)
    if but is not None:
        q = q.where(MaintenanceWindow.id != but)
    return db.session.scalar(q) is not None


def create(actor: str, fields: dict) -> MaintenanceWindow:
    """Add a window from the operator's fields (:data:`FIELDS`; ``labels`` optional)."""
    w = _validated({"labels": {}, **fields})
    if _exists(w.name):
        raise Refusal(409, "window_exists", f"a maintenance window named {w.name!r} already exists")
    row = MaintenanceWindow(created_by=actor, created_at=utcnow())
    _store(row, w)
    db.session.add(row)
    _flush_unique(w.name)
    AuditEvent.record(actor, "maintenance_window.created", f"maintenance_window:{row.id}", **to_fields(row))
    db.session.commit()
    return row


def update(row: MaintenanceWindow, actor: str, fields: dict) -> MaintenanceWindow:
    """Change some of a window's fields; the result is validated as a whole."""
    w = _validated({**to_fields(row), **fields})
    if _exists(w.name, but=row.id):
        raise Refusal(409, "window_exists", f"a maintenance window named {w.name!r} already exists")
    before = to_fields(row)
    _store(row, w)
    _flush_unique(w.name)
    after = to_fields(row)
    changed = {k: {"from": before[k], "to": after[k]} for k in after if before[k] != after[k]}
    AuditEvent.record(actor, "maintenance_window.updated", f"maintenance_window:{row.id}", changed=changed)
    db.session.commit()
    return row


def delete(row: MaintenanceWindow, actor: str) -> None:
    AuditEvent.record(actor, "maintenance_window.deleted", f"maintenance_window:{row.id}", **to_fields(row))
    db.session.delete(row)
    db.session.commit()


def to_fields(row: MaintenanceWindow) -> dict:
    return {
        "name": row.name,
        "days": list(row.days),
        "start": row.start,
        "end": row.end,
        "timezone": row.timezone,
        "labels": dict(row.labels or {}),
    }


def to_dict(row: MaintenanceWindow, now: dt.datetime | None = None) -> dict:
    """The API's window: its fields, and whether it is open now, when it next opens and closes."""
    now = now or utcnow()
    w = Window.from_row(row)
    occ = w.current_or_next(now)
    return {
        "id": row.id,
        **to_fields(row),
        "description": w.describe(),
        "created_by": row.created_by,
        "created_at": isoformat(row.created_at),
        "open_now": occ.contains(now),
        "next_open": isoformat(w.next_open(now)),
        "next_close": isoformat(occ.closes),
    }


# --- the rollout's gate --------------------------------------------------------------------------


def all_windows() -> list[Window]:
    return [Window.from_row(r) for r in list_windows()]


def host_wait(host: Host, now: dt.datetime | None = None, windows: list[Window] | None = None) -> Wait | None:
    """None when ``host`` may be updated now; else the window it waits for and when that opens.

    A host may be updated while one of the windows that apply to it (by labels) is open; a host
    that no window applies to is not restricted.
    """
    return gate(all_windows() if windows is None else windows, host.labels, now or utcnow())


def window_gate(fu: FleetUpdate, host: Host) -> Wait | None:
    """The engine's one call before it dispatches ``host`` for rollout ``fu``."""
    if not fu.respect_windows:
        return None
    return host_wait(host)


def waits(fu: FleetUpdate, now: dt.datetime | None = None) -> list[dict]:
    """The rollout's pending hosts that are outside their windows: which window, and when it opens."""
    if not fu.respect_windows or fu.status not in ("running", "scheduled"):
        return []
    windows = all_windows()
    if not windows:
        return []
    now = now or utcnow()
    rows = db.session.execute(
        sa.select(FleetUpdateHost.host_id, Host.name, Host.labels)
        .join(Host, FleetUpdateHost.host_id == Host.id)
        .where(FleetUpdateHost.fleet_update_id == fu.id, FleetUpdateHost.status == "pending")
        .order_by(FleetUpdateHost.position)
    ).all()
    out = []
    for host_id, name, labels in rows:
        wait = gate(windows, labels, now)
        if wait is not None:
            out.append({"host_id": host_id, "name": name, "window": wait.window, "opens_at": isoformat(wait.opens_at)})
    return out
