"""Fleet rolling update: a state machine over ``fleet_updates`` / ``fleet_update_hosts``.

Each :func:`tick` reads the database and does the next step: settle the in-flight host from its
job, skip a host already at the target, halt on an offline host or a failure, or dispatch the
next host through the single-host path. All state is in the database, so a restarted server
resumes a rollout where it was. Ticks are woken at once when an update job ends (the fleet
subscribes to the watcher's ``job_ended`` announcement); the periodic scheduler tick is only a
safety net. The wake-up state lives on the runtime (``runtime().fleet_waker``), not here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from ..errors import Refusal
from ..extensions import db
from ..models import FLEET_HOST_STATUSES, Alert, AuditEvent, FleetUpdate, FleetUpdateHost, Host, Job
from ..oncommit import on_commit
from ..runtime import FLEET_TICK_JOB_ID, runtime
from ..timeutil import isoformat, utcnow
from . import dispatch, selection
from .selection import Selector

log = logging.getLogger(__name__)

TICK_JOB_ID = FLEET_TICK_JOB_ID
HALT_DEDUP = "fleet"
HISTORY_LIMIT = 20


def running() -> FleetUpdate | None:
    return db.session.scalar(sa.select(FleetUpdate).where(FleetUpdate.status == "running"))


def history(limit: int = HISTORY_LIMIT) -> list[FleetUpdate]:
    """Rollouts, newest first."""
    return list(db.session.scalars(sa.select(FleetUpdate).order_by(FleetUpdate.id.desc()).limit(limit)))


# --- the plan: which hosts a rollout takes, in which order, and which it leaves out -------------

#: How a rollout moves through its hosts. Only one policy today: one host at a time, in order,
#: halting at the first failure. A later policy (a canary, then waves) groups ``PlannedHost``
#: rows into waves; the plan already says which wave each host is in.
POLICY_SEQUENTIAL = "sequential"

#: Why a host is left out of a rollout (``LeftOut.reason``). ``excluded`` and ``not_selected``
#: come from the selector (:mod:`app.updates.selection`); the others from the host's state.
LEFT_OUT_REASONS = (
    "already_at_target",
    "ahead_of_target",
    "never_connected",
    "revoked",
    "cannot_update",
    "offline",
    selection.EXCLUDED,
    selection.NOT_SELECTED,
)


@dataclass(frozen=True)
class PlannedHost:
    host: Host
    position: int
    wave: int
    note: str | None = None  # what the rollout will do about it that the operator should know

    def to_dict(self) -> dict:
        h = self.host
        return {
            "host_id": h.id,
            "name": h.name,
            "position": self.position,
            "wave": self.wave,
            "agent_version": h.agent_version,
            "labels": dict(h.labels or {}),
            "online": bool(h.connected),
            "note": self.note,
        }


@dataclass(frozen=True)
class LeftOut:
    host: Host
    reason: str  # one of LEFT_OUT_REASONS
    detail: str

    def to_dict(self) -> dict:
        return {
            "host_id": self.host.id,
            "name": self.host.name,
            "agent_version": self.host.agent_version,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class Plan:
    """What :func:`start` would do now: the hosts it takes, in order, and those it leaves out."""

    target_version: str
    policy: str
    hosts: list[PlannedHost] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    selector: Selector = field(default_factory=Selector)

    @property
    def explicit(self) -> bool:
        """The caller named the hosts (``host_ids``)."""
        return self.selector.explicit

    def to_dict(self) -> dict:
        return {
            "target_version": self.target_version,
            "policy": self.policy,
            "selector": self.selector.to_dict(),
            "explicit": self.explicit,
            "hosts": [p.to_dict() for p in self.hosts],
            "left_out": [lo.to_dict() for lo in self.left_out],
        }

    def updates_nothing(self) -> bool:
        """True when no host of the plan would be updated (none taken, or each one skipped)."""
        return all(p.host.version_state(self.target_version) in ("current", "ahead") for p in self.hosts)

    def refusal(self) -> Refusal:
        """The 422 for a plan that updates no host, naming the hosts or why each was left out."""
        counts: dict[str, int] = {}
        for lo in self.left_out:
            counts[lo.reason] = counts.get(lo.reason, 0) + 1
        why = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())
        target = self.target_version
        if self.hosts:  # named hosts, every one already at (or past) the target: it would do nothing
            names = ", ".join(p.host.name for p in self.hosts)
            message = f"none of the selected hosts is behind the server's version {target}: "
            message += f"{names} already run it or a newer one" + (f"; left out: {why}" if why else "")
        elif why:
            message = f"no host is behind the server's version {target} and can be updated ({why})"
        elif self.selector.to_dict():
            message = f"no host matches the selector ({self.selector.describe()})"
        else:
            message = "no host is behind the server's version"
        return Refusal(422, "no_hosts_to_update", message)


def _left_out_reason(host: Host, target: str, explicit: bool) -> tuple[str, str] | None:
    """Why ``host`` stays out of a rollout to ``target``, or None when the rollout takes it."""
    from .dispatch import cannot_update_message

    if host.revoked_at is not None:
        return "revoked", f"host {host.name} is revoked: its agent can no longer connect"
    state = host.version_state(target)
    if state == "current" and not explicit:
        return "already_at_target", f"host {host.name} already runs {target}"
    if state == "ahead" and not explicit:
        return "ahead_of_target", f"host {host.name} runs {host.agent_version}, newer than {target}"
    if state in ("current", "ahead"):
        return None  # named: the rollout records it as skipped (see plan)
    if state == "unknown":
        return "never_connected", f"host {host.name} has never connected: its version is unknown"
    if not host.can_update():
        return "cannot_update", cannot_update_message(host)
    if not host.connected and not explicit:
        return "offline", f"host {host.name} is offline"
    return None


def plan(host_ids: list | None = None, *, selector: Selector | None = None) -> Plan:
    """The rollout :func:`start` would make now, without changing anything.

    ``selector`` picks the candidates (:class:`~app.updates.selection.Selector`: labels, OS,
    architecture, ``older_than``, named ``host_ids`` in their order, exclusions); ``host_ids``
    alone is shorthand for a selector of just those. Without either, every host, by name.

    A rollout takes the candidates that are behind the target and can update themselves; it
    leaves out revoked hosts, hosts that never connected and agents that cannot update, and
    lists the hosts the selector excludes (``excluded``) or, among named hosts, does not match
    (``not_selected``). The default selection also leaves out hosts already at (or past) the
    target and offline hosts. Named hosts stay in the rollout with a note: one at the target is
    recorded as skipped when its turn comes, and an offline one gets ``RM_FLEET_OFFLINE_GRACE_S``
    to reconnect, then halts the rollout. A plan in which no host would be updated is refused by
    :func:`start` (``no_hosts_to_update``).

    "Offline" is the database's record (``hosts.connected``), so the CLI's plan, made in another
    process than the server's, sees what the server sees.
    """
    if selector is None:
        selector = Selector.from_body({"host_ids": host_ids} if host_ids is not None else {})
    elif host_ids is not None:
        raise ValueError("give host_ids or a selector, not both")
    target = current_app.config["SERVER_VERSION"]
    explicit = selector.explicit
    chosen = selector.select()
    out = Plan(target_version=target, policy=POLICY_SEQUENTIAL, selector=selector)
    out.left_out.extend(LeftOut(host, reason, detail) for host, reason, detail in chosen.left_out)
    grace = float(current_app.config["FLEET_OFFLINE_GRACE_S"])
    for host in chosen.hosts:
        why = _left_out_reason(host, target, explicit)
        if why is not None:
            out.left_out.append(LeftOut(host, *why))
            continue
        note = None
        if host.version_state(target) in ("current", "ahead"):
            note = f"already runs {host.agent_version}: the rollout skips it"
        elif not host.connected:
            note = f"offline now: when its turn comes the rollout waits up to {grace:g} s for it, then halts"
        n = len(out.hosts)
        out.hosts.append(PlannedHost(host, position=n, wave=n, note=note))
    return out


def start(actor: str, host_ids: list | None = None, *, selector: Selector | None = None) -> FleetUpdate:
    """Create a rollout over the hosts :func:`plan` takes; the selector is stored on its row."""
    the_plan = plan(host_ids, selector=selector)
    hosts = [p.host for p in the_plan.hosts]
    if the_plan.updates_nothing():
        raise the_plan.refusal()
    if running() is not None:
        raise Refusal(409, "fleet_update_running", "a fleet update is already running")
    now = utcnow()
    fu = FleetUpdate(
        target_version=current_app.config["SERVER_VERSION"],
        status="running",
        created_by=actor,
        created_at=now,
        selector=the_plan.selector.to_dict(),
    )
    fu.hosts = [
        FleetUpdateHost(host_id=h.id, host_name=h.name, position=i, status="pending") for i, h in enumerate(hosts)
    ]
    db.session.add(fu)
    try:
        db.session.flush()
        AuditEvent.record(
            actor,
            "fleet.update_started",
            f"fleet_update:{fu.id}",
            target_version=fu.target_version,
            hosts=[h.name for h in hosts],
            selector=fu.selector,
        )
        db.session.commit()
    except IntegrityError:
        # The partial unique index: another admin's rollout won the race.
        db.session.rollback()
        raise Refusal(409, "fleet_update_running", "a fleet update is already running") from None
    log.info("fleet update %s started by %s over %d hosts", fu.id, actor, len(hosts))
    wake()
    return fu


def cancel(fleet_id: int, actor: str) -> FleetUpdate:
    fu = db.session.get(FleetUpdate, fleet_id)
    if fu is None:
        raise Refusal(404, "fleet_update_not_found", f"no fleet update with id {fleet_id}")
    now = utcnow()
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fleet_id, FleetUpdate.status == "running")
        .values(status="cancelled", finished_at=now, cancel_requested=True)
    )
    if not res.rowcount:
        db.session.rollback()
        raise Refusal(409, "fleet_update_not_running", f"fleet update {fleet_id} is {fu.status}, not running")
    db.session.execute(
        sa.update(FleetUpdateHost)
        .where(FleetUpdateHost.fleet_update_id == fleet_id, FleetUpdateHost.status == "pending")
        .values(status="cancelled", finished_at=now)
    )
    AuditEvent.record(actor, "fleet.update_cancelled", f"fleet_update:{fleet_id}")
    _announce_finished(fleet_id)
    db.session.commit()
    db.session.refresh(fu)
    return fu


# --- the state machine -------------------------------------------------------------------------


def wake() -> None:
    """Ask for a tick now (from any thread); never lost, even while a tick is running."""
    runtime().fleet_waker.wake()


def on_job_ended(job_id: str) -> None:
    """Subscribed to ``runtime().job_ended``: an update job ended, so the rollout may move on."""
    wake()


def run_ticks() -> None:
    """The scheduler job: tick until no wake-up arrived while ticking."""
    runtime().fleet_waker.run(_tick_until_idle)


def _tick_until_idle() -> None:
    try:
        while tick():
            pass
    finally:
        db.session.remove()


def tick() -> bool:
    """Advance the rollouts by one step; return True if something changed (tick again)."""
    settled = _settle_finished_rows()
    fu = running()
    if fu is None:
        return settled
    # Ask the database for the one row that decides the step rather than loading every row of
    # the rollout: loading N ORM rows twice per host made a rollout O(N^2) (docs/benchmarks.md).
    if _first_row(fu.id, "running") is not None:
        return settled  # wait for the in-flight host's job
    failed = _first_stopping_row(fu.id)
    if failed is not None:
        _halt(fu, failed)
        return True
    nxt = _first_row(fu.id, "pending")
    if nxt is None:
        _succeed(fu)
        return True
    return _advance(fu, nxt)


def _first_row(fleet_id: int, status: str) -> FleetUpdateHost | None:
    """The rollout's first row (by position) in ``status``, or None."""
    return db.session.scalar(
        sa.select(FleetUpdateHost)
        .where(FleetUpdateHost.fleet_update_id == fleet_id, FleetUpdateHost.status == status)
        .order_by(FleetUpdateHost.position)
        .limit(1)
    )


def _first_stopping_row(fleet_id: int) -> FleetUpdateHost | None:
    """The first row that halts the rollout: a failed host, or one whose update was cut short.

    A host deleted during its update (its job ``cancelled``, "host deleted") halts the rollout
    like a failure: its update was started and did not end with the host updated, and the
    rollout cannot tell whether that had to do with the release. A deleted host that was still
    pending is passed over (it was never touched; see :func:`_advance`).
    """
    return db.session.scalar(
        sa.select(FleetUpdateHost)
        .where(
            FleetUpdateHost.fleet_update_id == fleet_id,
            sa.or_(
                FleetUpdateHost.status == "failed",
                sa.and_(FleetUpdateHost.status == "cancelled", FleetUpdateHost.started_at.is_not(None)),
            ),
        )
        .order_by(FleetUpdateHost.position)
        .limit(1)
    )


def _settle_finished_rows() -> bool:
    """Copy terminal job states onto running fleet rows (any rollout, cancelled ones too)."""
    rows = db.session.execute(
        sa.select(FleetUpdateHost, Job)
        .join(Job, FleetUpdateHost.job_id == Job.id)
        .where(FleetUpdateHost.status == "running", Job.status != "running")
    ).all()
    for row, job in rows:
        row.status = job.status if job.status in ("succeeded", "cancelled") else "failed"
        row.error = job.error
        row.finished_at = job.finished_at or utcnow()
    # A running row whose job is gone (host deleted) cannot finish by itself.
    orphans = db.session.scalars(
        sa.select(FleetUpdateHost).where(FleetUpdateHost.status == "running", FleetUpdateHost.job_id.is_(None))
    ).all()
    for row in orphans:
        row.status, row.error, row.finished_at = "failed", "update job disappeared", utcnow()
    if rows or orphans:
        db.session.commit()
        return True
    return False


def host_connected(host_id: int) -> None:
    """Called on every agent hello: wake the rollout if it is waiting for this host to come back."""
    runtime().fleet_waker.wake_for(host_id)


def _offline_grace_left(host: Host) -> float:
    """Seconds this offline host still gets to reconnect before the rollout halts at it.

    After a server restart every host is offline until its agent reconnects (with backoff), so
    the grace counts from the later of the host's last sighting and this server's start.
    """
    started = runtime().started_at
    since = max(t for t in (host.last_seen, started) if t is not None) if (host.last_seen or started) else utcnow()
    return float(current_app.config["FLEET_OFFLINE_GRACE_S"]) - (utcnow() - since).total_seconds()


def offline_wait(fu: FleetUpdate) -> dict | None:
    """What a running rollout is waiting for, if it waits for an offline host to come back.

    ``{"host_id", "name", "left_s"}``: the host at the front of the queue is offline and the
    rollout gives it ``left_s`` more seconds (``FLEET_OFFLINE_GRACE_S``) before halting there.
    """
    if fu.status != "running" or _first_row(fu.id, "running") is not None:
        return None
    row = _first_row(fu.id, "pending")
    host = row.host if row is not None else None
    if host is None or host.agent_version == fu.target_version:
        return None
    if host.connected and runtime().connections.is_connected(host.id):
        return None
    return {"host_id": host.id, "name": host.name, "left_s": max(0, round(_offline_grace_left(host)))}


def halt_reason(name: str, error: str | None) -> str:
    """``host <name>: <error>``, naming the host once: a refusal's message often names it already."""
    error = error or "update failed"
    if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", error):
        return error
    return f"host {name}: {error}"


def _advance(fu: FleetUpdate, row: FleetUpdateHost) -> bool:
    waker = runtime().fleet_waker
    host = row.host
    now = utcnow()
    if host is None:  # deleted before its turn
        _finish_row(row, "cancelled", "host deleted")
        return True
    if host.agent_version == fu.target_version:
        _finish_row(row, "skipped", None)
        return True
    if not host.connected or not runtime().connections.is_connected(host.id):
        if _offline_grace_left(host) > 0:
            waker.waiting_for = host.id  # its hello wakes us; the periodic tick re-checks the grace
            db.session.rollback()
            return False
        grace = float(current_app.config["FLEET_OFFLINE_GRACE_S"])
        _finish_row(row, "failed", f"stayed offline past the {grace:g} s grace to reconnect")
        _halt(fu, row)
        return True
    waker.waiting_for = None
    try:
        dispatch.dispatch_update(host.id, f"fleet:{fu.id}", fleet_host_row_id=row.id)
    except Refusal as refusal:
        db.session.rollback()
        if refusal.code == "already_current":
            _finish_row(row, "skipped", refusal.message)
            return True
        row = db.session.get(FleetUpdateHost, row.id)
        _finish_row(row, "failed", refusal.message)
        _halt(fu, row)
        return True
    log.info("fleet update %s: dispatched host %s (%s)", fu.id, host.name, now)
    return True


def _finish_row(row: FleetUpdateHost, status: str, error: str | None) -> None:
    row.status, row.error, row.finished_at = status, error, utcnow()
    db.session.commit()


def _halt(fu: FleetUpdate, row: FleetUpdateHost) -> None:
    name = row.name or str(row.host_id)
    reason = halt_reason(name, row.error)
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fu.id, FleetUpdate.status == "running")
        .values(status="halted", finished_at=utcnow(), halt_reason=reason)
    )
    if not res.rowcount:
        db.session.rollback()
        return
    AuditEvent.record("system", "fleet.update_halted", f"fleet_update:{fu.id}", host=name, reason=reason)
    Alert.raise_or_touch(
        "fleet_update_halted", HALT_DEDUP, f"Fleet update {fu.id} to {fu.target_version} halted at {reason}"
    )
    _announce_finished(fu.id)
    db.session.commit()
    log.warning("fleet update %s halted at %s", fu.id, reason)


def _succeed(fu: FleetUpdate) -> None:
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fu.id, FleetUpdate.status == "running")
        .values(status="succeeded", finished_at=utcnow())
    )
    if not res.rowcount:
        db.session.rollback()
        return
    AuditEvent.record("system", "fleet.update_succeeded", f"fleet_update:{fu.id}", target_version=fu.target_version)
    Alert.resolve("fleet_update_halted", HALT_DEDUP)
    _announce_finished(fu.id)
    db.session.commit()
    log.info("fleet update %s succeeded", fu.id)


def correct_host_row(job_id: str, reason: str) -> None:
    """Carry a job corrected from succeeded to failed onto its rollout (in the caller's transaction).

    Subscribed to ``runtime().job_corrected``, which the watcher publishes inside that transaction.

    A running rollout then halts at its next tick; one that already finished is marked halted
    now, with the alert, because its record must not claim a host it left on the old version.
    """
    row = db.session.scalar(
        sa.select(FleetUpdateHost).where(FleetUpdateHost.job_id == job_id, FleetUpdateHost.status == "succeeded")
    )
    if row is None:
        return
    row.status, row.error = "failed", reason
    fu = row.fleet_update
    if fu.status == "succeeded":
        name = row.name or str(row.host_id)
        fu.status, fu.halt_reason = "halted", halt_reason(name, reason)
        AuditEvent.record("system", "fleet.update_halted", f"fleet_update:{fu.id}", host=name, reason=fu.halt_reason)
        Alert.raise_or_touch(
            "fleet_update_halted", HALT_DEDUP, f"Fleet update {fu.id} to {fu.target_version} halted at {fu.halt_reason}"
        )
        _announce_finished(fu.id)


def summary(fleet_id: int) -> dict:
    """The rollout in a few numbers, as the database has it now: hosts counted by state, wall time."""
    fu = db.session.execute(
        sa.select(
            FleetUpdate.id,
            FleetUpdate.status,
            FleetUpdate.target_version,
            FleetUpdate.created_by,
            FleetUpdate.created_at,
            FleetUpdate.finished_at,
            FleetUpdate.halt_reason,
        ).where(FleetUpdate.id == fleet_id)
    ).one()
    found = dict(
        db.session.execute(
            sa.select(FleetUpdateHost.status, sa.func.count(FleetUpdateHost.id))
            .where(FleetUpdateHost.fleet_update_id == fleet_id)
            .group_by(FleetUpdateHost.status)
        ).all()
    )
    counts = {state: int(found.get(state, 0)) for state in FLEET_HOST_STATUSES}
    wall = (fu.finished_at - fu.created_at).total_seconds() if fu.finished_at and fu.created_at else None
    return {
        "id": fu.id,
        "status": fu.status,
        "target_version": fu.target_version,
        "created_by": fu.created_by,
        "created_at": isoformat(fu.created_at),
        "finished_at": isoformat(fu.finished_at),
        "wall_time_s": wall,
        "halt_reason": fu.halt_reason,
        "total": sum(counts.values()),
        "counts": counts,
    }


def _announce_finished(fleet_id: int) -> None:
    """Announce ``runtime().fleet_finished`` (people are notified) once this transaction commits."""
    on_commit(runtime().fleet_finished.publish, summary(fleet_id))
