"""Scheduled rollouts: created ``scheduled`` with a ``start_at``, started by the fleet tick when due.

A scheduled rollout stores what was asked (the selector, the strategy, ``respect_windows``) and
takes its hosts **when it starts**, not when it is created: hosts enrolled, updated or gone in
between are seen as they are at the start, and the hosts it took are recorded on its rows and in
the ``fleet.update_started`` audit record. Everything is in the database, so a restart neither
loses a scheduled start (the first tick after it starts an overdue rollout) nor repeats one
(starting is one ``UPDATE ... WHERE status = 'scheduled'`` together with the host rows, in one
transaction). At most one rollout runs: a rollout that becomes due while another runs waits
(``waiting_for`` on the page and in the API) and starts at the first tick after that one ends;
several due rollouts start one after another, earliest ``start_at`` first.
"""

from __future__ import annotations

import datetime as dt
import logging
import re

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from ..errors import Refusal
from ..extensions import db
from ..models import Alert, AuditEvent, FleetUpdate
from ..runtime import runtime
from ..timeutil import isoformat, utcnow
from . import fleet, maintenance, revert, selection
from .selection import Selector
from .strategy import Strategy
from .windows import WindowError, parse_zone, resolve_wall

log = logging.getLogger(__name__)

#: How far ahead a rollout may be scheduled.
MAX_AHEAD = dt.timedelta(days=366)
#: Left-out reasons that mean "nothing to do" rather than "could not do it".
_NOTHING_TO_DO = ("already_at_target", "ahead_of_target", selection.EXCLUDED, selection.NOT_SELECTED)


#: What ``start_at`` looks like (docs/openapi.json has the same pattern): ISO 8601 date and time,
#: seconds and fractions optional, an optional UTC offset (``Z`` or ``+01:00``).
START_AT_RE = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]"
    r"(:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?"
)


def parse_start_at(value, timezone=None, now: dt.datetime | None = None) -> tuple[dt.datetime, str]:
    """``start_at`` (ISO 8601) as a naive UTC instant, and the zone to show it in.

    With an offset (``2026-12-05T02:00:00+01:00``, ``...Z``) it is that instant (``timezone``, if
    given too, is only how it is shown); without one, ``timezone`` (an IANA name) says whose wall
    clock it is, with the windows' rule for a time a clock change skips or repeats. It must lie in
    the future, at most a year ahead. Malformed: 400 ``invalid_start_at`` / ``invalid_timezone``;
    well-formed but unusable (no such date, no offset and no zone, past, too far): 422
    ``invalid_start_at``.
    """
    zone = None
    if timezone is not None:
        try:
            zone = parse_zone(timezone)
        except WindowError as e:
            raise Refusal(400, "invalid_timezone", str(e)) from None
    if not isinstance(value, str) or not START_AT_RE.fullmatch(value):
        raise Refusal(400, "invalid_start_at", "start_at must be an ISO 8601 date and time, e.g. 2026-12-05T02:00:00Z")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Refusal(422, "invalid_start_at", f"start_at {value!r} is not a date that exists") from None
    if parsed.tzinfo is not None:
        instant = parsed.astimezone(dt.UTC).replace(tzinfo=None)
        offset = "UTC" if parsed.utcoffset() == dt.timedelta(0) else parsed.strftime("%z")
        shown = zone.key if zone is not None else offset
    elif zone is not None:
        instant, shown = resolve_wall(parsed, zone), zone.key
    else:
        raise Refusal(
            422,
            "invalid_start_at",
            "start_at has no UTC offset: add one (2026-12-05T02:00:00+01:00, or Z for UTC) or give a timezone",
        )
    now = now or utcnow()
    if instant <= now:
        message = f"start_at {isoformat(instant)} is not in the future (now {isoformat(now)})"
        raise Refusal(422, "invalid_start_at", message)
    if instant > now + MAX_AHEAD:
        raise Refusal(422, "invalid_start_at", "start_at is more than a year ahead")
    return instant, shown


def start_from_body(actor: str, body: dict) -> FleetUpdate:
    """``POST /api/fleet/update``: start now, or with ``start_at`` schedule the start."""
    respect, revert_on_halt = fleet.flag(body, "respect_windows"), fleet.flag(body, "revert_on_halt")
    selector, strategy = Selector.from_body(body), Strategy.from_body(body)
    return start_or_schedule(
        actor, selector, strategy, respect, body.get("start_at"), body.get("timezone"), revert_on_halt
    )


def start_or_schedule(
    actor: str,
    selector: Selector,
    strategy: Strategy,
    respect_windows: bool,
    start_at=None,
    timezone=None,
    revert_on_halt: bool = False,
) -> FleetUpdate:
    """Start a rollout now (no ``start_at``) or schedule it (the API's and the CLI's one path)."""
    if start_at is None:
        if timezone is not None:
            raise Refusal(422, "invalid_start_at", "timezone only goes with start_at")
        return fleet.start(
            actor, strategy=strategy, selector=selector, respect_windows=respect_windows, revert_on_halt=revert_on_halt
        )
    when, shown = parse_start_at(start_at, timezone)
    return create(actor, selector, when, shown, respect_windows, strategy, revert_on_halt)


def create(
    actor: str,
    selector: Selector,
    start_at: dt.datetime,
    start_tz: str,
    respect_windows: bool,
    strategy: Strategy | None = None,
    revert_on_halt: bool = False,
) -> FleetUpdate:
    """A ``scheduled`` rollout; its hosts are taken when it starts (see the module docstring)."""
    strategy = strategy or Strategy()
    preview = fleet.plan(strategy=strategy, selector=selector)  # refuses unknown host ids now, not at 3 am
    now = utcnow()
    fu = FleetUpdate(
        target_version=current_app.config["SERVER_VERSION"],
        status="scheduled",
        created_by=actor,
        created_at=now,
        selector=selector.to_dict(),
        start_at=start_at,
        start_tz=start_tz,
        respect_windows=respect_windows,
        revert_on_halt=revert_on_halt,
        **strategy.columns(),
    )
    db.session.add(fu)
    db.session.flush()
    AuditEvent.record(
        actor,
        "fleet.update_scheduled",
        f"fleet_update:{fu.id}",
        target_version=fu.target_version,
        start_at=isoformat(start_at),
        start_tz=start_tz,
        selector=fu.selector,
        respect_windows=respect_windows,
        revert_on_halt=revert_on_halt,
        strategy=strategy.to_dict(),
        hosts_now=[p.host.name for p in preview.hosts],
    )
    db.session.commit()
    log.info("fleet update %s scheduled by %s for %s (%s)", fu.id, actor, isoformat(start_at), start_tz)
    return fu


def scheduled() -> list[FleetUpdate]:
    """Rollouts waiting for their start, the next first."""
    q = sa.select(FleetUpdate).where(FleetUpdate.status == "scheduled").order_by(FleetUpdate.start_at, FleetUpdate.id)
    return list(db.session.scalars(q))


def waiting_for(fu: FleetUpdate, now: dt.datetime | None = None) -> str | None:
    """Why a due scheduled rollout has not started: the running rollout it waits for (or None)."""
    if fu.status != "scheduled" or fu.start_at > (now or utcnow()):
        return None
    other = fleet.running()
    if other is not None:
        return f"due since {isoformat(fu.start_at)}: waits for rollout {other.id} to finish"
    first = scheduled()
    if first and first[0].id != fu.id:
        return f"due since {isoformat(fu.start_at)}: starts after rollout {first[0].id}"
    settle = reconnect_grace_until()
    if settle is not None and (now or utcnow()) < settle:
        return f"due since {isoformat(fu.start_at)}: starts at {isoformat(settle)}, once agents had time to reconnect"
    return f"due since {isoformat(fu.start_at)}: starts at the next tick"


def describe(fu: FleetUpdate) -> dict:
    """The API's rollout: its record, and what it waits for now (a running rollout, windows)."""
    return {**fu.to_dict(), "waiting_for": waiting_for(fu), "window_waits": maintenance.waits(fu)}


def reconnect_grace_until() -> dt.datetime | None:
    """Until when, after this server started, agents may still be reconnecting (with backoff).

    A due rollout does not start before then: its plan takes online hosts only, so starting at the
    first tick after a restart would leave out every host whose agent had not reconnected yet.
    """
    started = runtime().started_at
    if started is None:
        return None
    return started + dt.timedelta(seconds=float(current_app.config["FLEET_OFFLINE_GRACE_S"]))


def start_due() -> bool:
    """Start the earliest due scheduled rollout if none runs; True if one started (or ended)."""
    if fleet.running() is not None:
        return False
    now = utcnow()
    settle = reconnect_grace_until()
    if settle is not None and now < settle:
        return False  # agents are still reconnecting after a restart; the periodic tick comes back
    fu = db.session.scalar(
        sa.select(FleetUpdate)
        .where(FleetUpdate.status == "scheduled", FleetUpdate.start_at <= now)
        .order_by(FleetUpdate.start_at, FleetUpdate.id)
        .limit(1)
    )
    if fu is None:
        return False
    return _begin(fu, now)


def _begin(fu: FleetUpdate, now: dt.datetime) -> bool:
    # Claim it: the status change is the one thing that makes a start happen once. It commits
    # together with the host rows (or not at all): a crash in between leaves it scheduled.
    claimed = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fu.id, FleetUpdate.status == "scheduled")
        .values(status="running", started_at=now)
    ).rowcount
    if not claimed:
        db.session.rollback()  # cancelled meanwhile
        return True
    target = current_app.config["SERVER_VERSION"]
    try:
        if fu.target_version != target:
            raise Refusal(409, "server_version_changed", f"the server now runs {target}, not {fu.target_version}")
        the_plan = fleet.plan(strategy=Strategy.of(fu), selector=Selector.from_body(fu.selector))
    except Refusal as refusal:
        return _end(fu, "halted", f"could not start at {isoformat(now)}: {refusal.message}")
    if the_plan.updates_nothing():
        if all(lo.reason in _NOTHING_TO_DO for lo in the_plan.left_out) and not the_plan.hosts:
            return _end(fu, "succeeded", None)
        return _end(fu, "halted", f"could not start at {isoformat(now)}: {the_plan.refusal().message}")
    fu.hosts = fleet.host_rows(the_plan)
    AuditEvent.record(
        "system",
        "fleet.update_started",
        f"fleet_update:{fu.id}",
        target_version=fu.target_version,
        hosts=[p.host.name for p in the_plan.hosts],
        selector=fu.selector,
        strategy=Strategy.of(fu).to_dict(),
        scheduled_by=fu.created_by,
        start_at=isoformat(fu.start_at),
    )
    try:
        db.session.commit()
    except IntegrityError:  # another rollout started in between (another process): try again later
        db.session.rollback()
        return False
    log.info("scheduled fleet update %s started over %d hosts", fu.id, len(the_plan.hosts))
    fleet.wake()
    return True


def _end(fu: FleetUpdate, status: str, reason: str | None) -> bool:
    """End a scheduled rollout at its start without taking any host (nothing to do, or it could not)."""
    fu.status, fu.finished_at, fu.halt_reason = status, utcnow(), reason
    AuditEvent.record("system", f"fleet.update_{status}", f"fleet_update:{fu.id}", reason=reason, hosts=[])
    if status == "halted":
        Alert.raise_or_touch(
            "fleet_update_halted", fleet.HALT_DEDUP, f"Fleet update {fu.id} to {fu.target_version} halted: {reason}"
        )
    fleet._announce_finished(fu.id)
    db.session.commit()
    log.warning("scheduled fleet update %s %s at its start: %s", fu.id, status, reason or "nothing to update")
    return True


def run_ticks() -> None:
    """The scheduler's fleet job: start a due revert or scheduled rollout, advance the running one, repeat."""
    runtime().fleet_waker.run(_start_and_tick_until_idle)


def _start_and_tick_until_idle() -> None:
    try:
        # A halted rollout's revert first: taking hosts back outranks starting new work.
        while revert.start_due() or start_due() or fleet.tick():
            pass
    finally:
        db.session.remove()
