"""Fleet rolling update: a state machine over ``fleet_updates`` / ``fleet_update_hosts``.

Each :func:`tick` reads the database and does the next step: settle in-flight hosts from their
jobs, halt when the failure budget is exceeded, skip hosts already at the target, apply the
offline policy, or dispatch the next hosts of the current wave through the single-host path, up
to the in-flight limit. The strategy (counts, percentages, waves) is :mod:`.strategy`. All
state is in the database, so a restarted server resumes a rollout where it was. Ticks are woken
at once when an update job ends (the fleet subscribes to the watcher's ``job_ended``
announcement); the periodic scheduler tick is only a safety net. The wake-up state lives on
the runtime (``runtime().fleet_waker``), not here.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from ..errors import Refusal
from ..extensions import db
from ..inputs import MAX_ID, is_id
from ..models import FLEET_HOST_STATUSES, Alert, AuditEvent, FleetUpdate, FleetUpdateHost, Host, Job
from ..oncommit import on_commit
from ..runtime import FLEET_TICK_JOB_ID, runtime
from ..timeutil import isoformat, utcnow
from . import dispatch, maintenance, selection
from .selection import Selector
from .strategy import Strategy, assign_waves

log = logging.getLogger(__name__)

TICK_JOB_ID = FLEET_TICK_JOB_ID
HALT_DEDUP = "fleet"
HISTORY_LIMIT = 20


def running() -> FleetUpdate | None:
    return db.session.scalar(sa.select(FleetUpdate).where(FleetUpdate.status == "running"))


def history(limit: int = HISTORY_LIMIT) -> list[FleetUpdate]:
    """Rollouts, newest first."""
    return list(db.session.scalars(sa.select(FleetUpdate).order_by(FleetUpdate.id.desc()).limit(limit)))


# --- the plan: which hosts a rollout takes, in which order, in which wave, and which it leaves out


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
    """What :func:`start` would do now: the hosts it takes, in order and in waves, and those it leaves out."""

    target_version: str
    strategy: Strategy = field(default_factory=Strategy)
    hosts: list[PlannedHost] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    selector: Selector = field(default_factory=Selector)

    @property
    def explicit(self) -> bool:
        """The caller named the hosts (``host_ids``)."""
        return self.selector.explicit

    @property
    def policy(self) -> str:
        """``sequential`` (the default strategy: one host at a time, halt at the first failure) or ``waves``."""
        return "sequential" if self.strategy == Strategy() else "waves"

    def waves(self) -> list[dict]:
        """The hosts grouped by wave, in order: ``[{"wave", "canary", "soak_before_s", "hosts"}]``."""
        out: list[dict] = []
        for p in self.hosts:
            if not out or out[-1]["wave"] != p.wave:
                out.append(
                    {
                        "wave": p.wave,
                        "canary": bool(self.strategy.canary) and p.wave == 0,
                        "soak_before_s": self.strategy.soak_before(p.wave),
                        "hosts": [],
                    }
                )
            out[-1]["hosts"].append(p.to_dict())
        return out

    def to_dict(self) -> dict:
        total = len(self.hosts)
        return {
            "target_version": self.target_version,
            "policy": self.policy,
            "selector": self.selector.to_dict(),
            "strategy": self.strategy.to_dict(),
            "summary": self.strategy.describe(total),
            "max_in_flight_hosts": self.strategy.in_flight(total),
            "failure_budget_hosts": self.strategy.failure_budget(total),
            "explicit": self.explicit,
            "waves": self.waves(),
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


def _offline_note(strategy: Strategy) -> str:
    """What the rollout will do about a host that is offline when its turn comes."""
    grace = float(current_app.config["FLEET_OFFLINE_GRACE_S"])
    if strategy.offline == "wait":
        return (
            f"offline now: offline=wait queues it and updates it when it comes back, "
            f"for up to {strategy.offline_deadline_s:g} s; then it is recorded as skipped"
        )
    if strategy.offline == "skip":
        return f"offline now: when its turn comes the rollout waits up to {grace:g} s for it, then skips it"
    return f"offline now: when its turn comes the rollout waits up to {grace:g} s for it, then halts"


def _left_out_reason(host: Host, target: str, explicit: bool, strategy: Strategy) -> tuple[str, str] | None:
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
    if not host.connected and not explicit and strategy.offline != "wait":
        return "offline", (
            f"host {host.name} is offline: with offline={strategy.offline} a rollout of the default "
            "selection leaves offline hosts out (name it in host_ids, or choose offline=wait, to take it)"
        )
    return None


def plan(host_ids: list | None = None, strategy: Strategy | None = None, *, selector: Selector | None = None) -> Plan:
    """The rollout :func:`start` would make now, without changing anything.

    ``selector`` picks the candidates (:class:`~app.updates.selection.Selector`: labels, OS,
    architecture, ``older_than``, named ``host_ids`` in their order, exclusions); ``host_ids``
    alone is shorthand for a selector of just those. Without either, every host, by name.

    A rollout takes the candidates that are behind the target and can update themselves; it
    leaves out revoked hosts, hosts that never connected and agents that cannot update, and
    lists the hosts the selector excludes (``excluded``) or, among named hosts, does not match
    (``not_selected``). The default selection also leaves out hosts already at (or past) the
    target and, unless ``offline=wait``, offline hosts. Named hosts stay in the rollout with a
    note: one at the target is recorded as skipped when its turn comes, and an offline one is
    handled by the strategy's offline policy. The hosts are grouped into waves
    (:func:`strategy.assign_waves`). A plan in which no host would be updated is refused by
    :func:`start` (``no_hosts_to_update``).

    "Offline" is the database's record (``hosts.connected``), so the CLI's plan, made in another
    process than the server's, sees what the server sees.
    """
    if selector is None:
        selector = Selector.from_body({"host_ids": host_ids} if host_ids is not None else {})
    elif host_ids is not None:
        raise ValueError("give host_ids or a selector, not both")
    strategy = strategy or Strategy()
    target = current_app.config["SERVER_VERSION"]
    explicit = selector.explicit
    chosen = selector.select()
    out = Plan(target_version=target, strategy=strategy, selector=selector)
    out.left_out.extend(LeftOut(host, reason, detail) for host, reason, detail in chosen.left_out)
    taken: list[tuple[Host, str | None]] = []
    for host in chosen.hosts:
        why = _left_out_reason(host, target, explicit, strategy)
        if why is not None:
            out.left_out.append(LeftOut(host, *why))
            continue
        note = None
        if host.version_state(target) in ("current", "ahead"):
            note = f"already runs {host.agent_version}: the rollout skips it"
        elif not host.connected:
            note = _offline_note(strategy)
        taken.append((host, note))
    waves = assign_waves(len(taken), strategy)
    out.hosts = [PlannedHost(h, position=i, wave=waves[i], note=note) for i, (h, note) in enumerate(taken)]
    return out


def plan_from_body(body: dict) -> Plan:
    """The plan for a ``POST /api/fleet/plan`` / ``/api/fleet/update`` body (400s for bad fields)."""
    return plan(strategy=Strategy.from_body(body), selector=Selector.from_body(body))


def start_from_body(actor: str, body: dict) -> FleetUpdate:
    """Start the rollout a request body asks for now (the fleet page's form; the API also schedules)."""
    return start(
        actor,
        strategy=Strategy.from_body(body),
        selector=Selector.from_body(body),
        revert_on_halt=flag(body, "revert_on_halt"),
    )


def flag(body: dict, name: str) -> bool:
    """A request's true/false field (absent: false); 400 ``invalid_field`` for anything else."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise Refusal(400, "invalid_field", f"{name} must be true or false")
    return value


def start(
    actor: str,
    host_ids: list | None = None,
    strategy: Strategy | None = None,
    *,
    selector: Selector | None = None,
    kind: str = "update",
    parent_id: int | None = None,
    respect_windows: bool = False,
    revert_on_halt: bool = False,
) -> FleetUpdate:
    """Create a rollout over the hosts :func:`plan` takes; the selector and strategy are stored on its row.

    ``revert_on_halt``: if it halts, take the hosts it updated back to their old versions
    (app/updates/revert.py).
    """
    the_plan = plan(host_ids, strategy, selector=selector)
    if the_plan.updates_nothing():
        raise the_plan.refusal()
    return create(
        actor, the_plan, kind=kind, parent_id=parent_id, respect_windows=respect_windows, revert_on_halt=revert_on_halt
    )


def create(
    actor: str,
    the_plan: Plan,
    *,
    kind: str = "update",
    parent_id: int | None = None,
    targets: dict[int, str] | None = None,
    respect_windows: bool = False,
    revert_on_halt: bool = False,
) -> FleetUpdate:
    """Write the rollout ``the_plan`` describes, running from now, audited; 409 while another runs.

    ``targets``: a host's own target version where it is not the rollout's (a revert's rows).
    """
    strategy = the_plan.strategy
    if running() is not None:
        raise Refusal(409, "fleet_update_running", "a fleet update is already running")
    now = utcnow()
    fu = FleetUpdate(
        target_version=the_plan.target_version,
        status="running",
        created_by=actor,
        created_at=now,
        started_at=now,
        kind=kind,
        parent_id=parent_id,
        selector=the_plan.selector.to_dict(),
        respect_windows=respect_windows,
        revert_on_halt=revert_on_halt,
        **strategy.columns(),
    )
    fu.hosts = host_rows(the_plan, targets)
    db.session.add(fu)
    try:
        db.session.flush()
        details = {"versions": {p.host.name: targets[p.host.id] for p in the_plan.hosts}} if targets else {}
        AuditEvent.record(
            actor,
            "fleet.update_started",
            f"fleet_update:{fu.id}",
            target_version=fu.target_version,
            hosts=[p.host.name for p in the_plan.hosts],
            selector=fu.selector,
            strategy=strategy.to_dict(),
            kind=kind,
            parent_id=parent_id,
            revert_on_halt=revert_on_halt,
            **details,
        )
        db.session.commit()
    except IntegrityError:
        # The partial unique index: another admin's rollout won the race.
        db.session.rollback()
        raise Refusal(409, "fleet_update_running", "a fleet update is already running") from None
    log.info("fleet update %s started by %s over %d hosts (%s)", fu.id, actor, len(fu.hosts), strategy)
    wake()
    return fu


def host_rows(the_plan: Plan, targets: dict[int, str] | None = None) -> list[FleetUpdateHost]:
    """The ``pending`` rows of a new rollout over ``the_plan``'s hosts, in its waves.

    ``targets``: a host's own target version where it is not the rollout's (a revert's rows).
    """
    targets = targets or {}
    return [
        FleetUpdateHost(
            host_id=p.host.id,
            host_name=p.host.name,
            position=p.position,
            wave=p.wave,
            status="pending",
            target_version=targets.get(p.host.id),
        )
        for p in the_plan.hosts
    ]


# --- control: cancel, pause, resume, skip one host, retry --------------------------------------


def _get(fleet_id: int) -> FleetUpdate:
    fu = db.session.get(FleetUpdate, fleet_id)
    if fu is None:
        raise Refusal(404, "fleet_update_not_found", f"no fleet update with id {fleet_id}")
    return fu


def _not_running(fu: FleetUpdate) -> Refusal:
    return Refusal(409, "fleet_update_not_running", f"fleet update {fu.id} is {fu.status}, not running")


def cancel(fleet_id: int, actor: str) -> FleetUpdate:
    """Cancel a running rollout before its next dispatch, or a scheduled one before it starts."""
    fu = _get(fleet_id)
    now, was = utcnow(), fu.status
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fleet_id, FleetUpdate.status.in_(("running", "scheduled")))
        .values(status="cancelled", finished_at=now, cancel_requested=True, hold_until=None)
    )
    if not res.rowcount:
        db.session.rollback()
        raise Refusal(409, "fleet_update_not_running", f"fleet update {fu.id} is {fu.status}, not running or scheduled")
    db.session.execute(
        sa.update(FleetUpdateHost)
        .where(FleetUpdateHost.fleet_update_id == fleet_id, FleetUpdateHost.status == "pending")
        .values(status="cancelled", finished_at=now)
    )
    AuditEvent.record(actor, "fleet.update_cancelled", f"fleet_update:{fleet_id}", was=was)
    _announce_finished(fleet_id)
    db.session.commit()
    db.session.refresh(fu)
    return fu


def pause(fleet_id: int, actor: str) -> FleetUpdate:
    """Stop dispatching (in-flight jobs finish); the rollout stays ``running`` with ``paused_at`` set."""
    return _set_paused(fleet_id, actor, True)


def resume(fleet_id: int, actor: str) -> FleetUpdate:
    return _set_paused(fleet_id, actor, False)


def _set_paused(fleet_id: int, actor: str, paused: bool) -> FleetUpdate:
    """Pause or resume a running rollout, audited; 409 when it is not running or already so."""
    fu = _get(fleet_id)
    not_yet = FleetUpdate.paused_at.is_(None) if paused else FleetUpdate.paused_at.is_not(None)
    values = {"paused_at": utcnow(), "paused_by": actor} if paused else {"paused_at": None, "paused_by": None}
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fleet_id, FleetUpdate.status == "running", not_yet)
        .values(**values)
    )
    if not res.rowcount:
        db.session.rollback()
        if fu.status != "running":
            raise _not_running(fu)
        if paused:
            raise Refusal(409, "fleet_update_paused", f"fleet update {fleet_id} is already paused")
        raise Refusal(409, "fleet_update_not_paused", f"fleet update {fleet_id} is not paused")
    verb = "paused" if paused else "resumed"
    AuditEvent.record(actor, f"fleet.update_{verb}", f"fleet_update:{fleet_id}")
    db.session.commit()
    db.session.refresh(fu)
    log.info("fleet update %s %s by %s", fleet_id, verb, actor)
    if not paused:
        wake()
    return fu


def skip_host(fleet_id: int, host_id, actor: str) -> FleetUpdate:
    """Record one pending host of a running rollout as ``skipped`` (by ``actor``): it is not updated."""
    fu = _get(fleet_id)
    if not is_id(host_id):
        raise Refusal(400, "invalid_host_id", f"host_id must be a host id (1 to {MAX_ID})")
    row = db.session.scalar(
        sa.select(FleetUpdateHost).where(
            FleetUpdateHost.fleet_update_id == fleet_id, FleetUpdateHost.host_id == host_id
        )
    )
    if row is None:
        raise Refusal(404, "fleet_host_not_found", f"host {host_id} is not in fleet update {fleet_id}")
    if fu.status != "running":
        raise _not_running(fu)
    res = db.session.execute(
        sa.update(FleetUpdateHost)
        .where(FleetUpdateHost.id == row.id, FleetUpdateHost.status == "pending")
        .values(status="skipped", error=f"skipped by {actor}", finished_at=utcnow())
    )
    if not res.rowcount:
        db.session.rollback()
        raise Refusal(
            409, "fleet_host_not_pending", f"host {row.name} is {row.status} in fleet update {fleet_id}, not pending"
        )
    AuditEvent.record(actor, "fleet.host_skipped", f"fleet_update:{fleet_id}", host=row.name, host_id=host_id)
    db.session.commit()
    db.session.refresh(fu)
    wake()
    return fu


def retry(fleet_id: int, actor: str) -> FleetUpdate:
    """Start a rollout (``kind='retry'``) of the failed and skipped hosts of a finished one, same strategy.

    Hosts that were deleted since are gone; hosts that reached the target meanwhile are left out
    (``already_at_target``); a retry that would update nothing is ``422 no_hosts_to_update``.
    """
    fu = _get(fleet_id)
    if fu.status in ("running", "scheduled"):
        raise Refusal(409, "fleet_update_running", f"fleet update {fleet_id} is {fu.status}: retry it once it ended")
    host_ids = list(
        db.session.scalars(
            sa.select(FleetUpdateHost.host_id)
            .where(
                FleetUpdateHost.fleet_update_id == fleet_id,
                FleetUpdateHost.status.in_(("failed", "skipped")),
                FleetUpdateHost.host_id.is_not(None),
            )
            .order_by(FleetUpdateHost.position)
        )
    )
    if not host_ids:
        raise Refusal(422, "no_hosts_to_update", f"fleet update {fleet_id} has no failed or skipped host to retry")
    target = current_app.config["SERVER_VERSION"]
    hosts = db.session.scalars(sa.select(Host).where(Host.id.in_(host_ids))).all()
    states = {h.id: h.version_state(target) for h in hosts}
    behind = [i for i in host_ids if states.get(i) not in (None, "current", "ahead")]
    if not behind:
        raise Refusal(
            422, "no_hosts_to_update", f"every failed or skipped host of fleet update {fleet_id} already runs {target}"
        )
    return start(actor, behind, Strategy.of(fu), kind="retry", parent_id=fu.id)


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
    """Advance the running rollout by one step; return True if something changed (tick again).

    One step: settle finished rows; halt if the failure budget is exceeded; succeed if nothing
    is left; otherwise (unless paused or soaking) fill the free in-flight slots with the next
    hosts of the current wave and with queued offline hosts that came back.

    The step reads the rows once, when it starts, and its commits (a dispatch each) do not
    expire them: reading each row, host and the rollout again after every dispatch's commit cost
    about five SELECTs per dispatched host. The database stays the truth: every tick starts from
    fresh reads, a dispatch still checks the host's running job and the partial unique index in
    its own transaction, and the caller's objects are expired when the tick ends, as a commit
    would have.
    """
    session = db.session()
    session.expire_all()
    was, session.expire_on_commit = session.expire_on_commit, False
    try:
        settled = _settle_finished_rows()
        fu = running()
        if fu is None:
            runtime().fleet_waker.waiting_for = frozenset()
            return settled
        return _step(fu) or settled
    finally:
        session.expire_on_commit = was
        session.expire_all()


@dataclass
class _Shape:
    """The rollout's rows in numbers (one aggregate query): what a step decides on."""

    total: int = 0
    counts: dict = field(default_factory=dict)
    failures: int = 0  # failed rows, and cancelled ones that had started (host deleted mid-update)
    running: int = 0  # rows in flight, queued (offline=wait) hosts included
    waiting: int = 0  # pending rows queued for an offline host to come back
    wave: int | None = None  # the current wave: the lowest with a row pending or running (not queued)
    max_wave: int = 0
    wave_started: bool = False  # a row of the current wave left ``pending`` (or was queued)


def _shape(fleet_id: int) -> _Shape:
    r = FleetUpdateHost
    rows = db.session.execute(
        sa.select(r.wave, r.status, r.waiting_since.is_not(None), r.started_at.is_not(None), sa.func.count(r.id))
        .where(r.fleet_update_id == fleet_id)
        .group_by(r.wave, r.status, r.waiting_since.is_not(None), r.started_at.is_not(None))
    ).all()
    s = _Shape()
    for wave, status, queued, started, n in rows:
        s.total += n
        s.max_wave = max(s.max_wave, wave)
        s.counts[status] = s.counts.get(status, 0) + n
        if status == "failed" or (status == "cancelled" and started):
            s.failures += n
        if status == "running":
            s.running += n
        if status == "pending" and queued:
            s.waiting += n
        if status in ("pending", "running") and not queued and (s.wave is None or wave < s.wave):
            s.wave = wave
    for wave, status, queued, _started, _n in rows:
        if wave == s.wave and (status != "pending" or queued):
            s.wave_started = True
    return s


def _step(fu: FleetUpdate) -> bool:
    strat = Strategy.of(fu)
    shape = _shape(fu.id)
    if shape.failures > strat.failure_budget(shape.total):
        _halt(fu, _first_stopping_row(fu.id), strat, shape)
        return True
    if not shape.counts.get("pending") and not shape.running:
        _succeed(fu, shape)
        return True
    if fu.paused_at is not None:
        return False  # in-flight jobs settle; nothing new starts
    now = utcnow()
    if shape.wave is not None and not shape.wave_started:
        soak = strat.soak_before(shape.wave)
        if soak > 0:
            if fu.hold_until is None:  # the previous wave just ended: watch it for ``soak`` seconds
                fu.hold_until = now + dt.timedelta(seconds=soak)
                db.session.commit()
                log.info("fleet update %s: soaking %g s before wave %s", fu.id, soak, shape.wave)
                return True
            if now < fu.hold_until:
                return False
            fu.hold_until = None  # over: the next wave's soak starts afresh
            db.session.commit()
    slots = strat.in_flight(shape.total) - shape.running
    if slots <= 0:
        return False
    rows = _next_rows(fu, shape, strat, slots, now)
    budget = strat.failure_budget(shape.total)
    changed = False
    waiting: set[int] = set()
    for row, host in rows:
        outcome = _consider(fu, strat, row, host, now)
        if outcome == "dispatched":
            slots -= 1
        if outcome in ("waiting", "held"):
            waiting.add(row.host_id)
        else:
            changed = True
        if outcome == "failed":
            shape.failures += 1
        if slots <= 0 or outcome == "held" or shape.failures > budget:
            break  # a host waiting out its grace holds back the hosts after it; a failure may halt
    queued = _queued_host_ids(fu.id) if shape.waiting else set()
    runtime().fleet_waker.waiting_for = frozenset(waiting | queued)
    return changed


def _next_rows(fu: FleetUpdate, shape: _Shape, strat: Strategy, slots: int, now) -> list:
    """The rows to consider now, with their hosts: queued offline hosts that came back (or whose
    deadline passed) first, then the next pending rows up to the next barrier (:func:`_reach`),
    in order: ``slots`` of them, and a few more in case some of them wait out an offline grace."""
    r = FleetUpdateHost
    out = []
    if shape.waiting:
        deadline = now - dt.timedelta(seconds=strat.offline_deadline_s or 0)
        out += db.session.execute(
            sa.select(r, Host)
            .outerjoin(Host, Host.id == r.host_id)
            .where(
                r.fleet_update_id == fu.id,
                r.status == "pending",
                r.waiting_since.is_not(None),
                sa.or_(Host.id.is_(None), Host.connected.is_(True), r.waiting_since <= deadline),
            )
            .order_by(r.position)
        ).all()
    if shape.wave is not None:
        out += db.session.execute(
            sa.select(r, Host)
            .outerjoin(Host, Host.id == r.host_id)
            .where(
                r.fleet_update_id == fu.id,
                r.status == "pending",
                r.waiting_since.is_(None),
                r.wave.between(shape.wave, _reach(shape, strat)),
            )
            .order_by(r.position)
            .limit(slots + 16)
        ).all()
    return out


def _reach(shape: _Shape, strat: Strategy) -> int:
    """The last wave whose hosts may start now: the window slides across waves up to a barrier.

    The canary wave is a barrier (the canary goes alone, then its soak), and so is every wave
    followed by a soak (``wave_soak_s``). Otherwise hosts of the next wave start as soon as slots
    free up: ``max_in_flight`` bounds the hosts in flight, not the waves (docs/updates.md).
    """
    if strat.wave_soak_s > 0 or (strat.canary and shape.wave == 0):
        return shape.wave
    return shape.max_wave


def _queued_host_ids(fleet_id: int) -> set[int]:
    return set(
        db.session.scalars(
            sa.select(FleetUpdateHost.host_id).where(
                FleetUpdateHost.fleet_update_id == fleet_id,
                FleetUpdateHost.status == "pending",
                FleetUpdateHost.waiting_since.is_not(None),
                FleetUpdateHost.host_id.is_not(None),
            )
        )
    )


def may_dispatch_now(fu: FleetUpdate, row: FleetUpdateHost, host: Host, now) -> str | None:
    """The one place that decides whether this host may be dispatched now: None, or why not yet.

    Offline hosts and hosts already at the target are handled by the caller; this is for gates
    that keep a host ``pending`` without touching it: the maintenance windows of a rollout with
    ``respect_windows`` (docs/updates.md, "Windows in a rollout"). The first time a host is held
    back its row records since when and for which window (the run report's waits).
    """
    wait = maintenance.window_gate(fu, host)
    if wait is None:
        return None
    if row.window_waiting_since is None:  # recorded once, for the run report's waits
        row.window_waiting_since, row.window_name = now, wait.window[:100]
        db.session.commit()
    return f"outside its maintenance windows until {isoformat(wait.opens_at)} ({wait.window})"


def _online(host: Host) -> bool:
    return bool(host.connected) and runtime().connections.is_connected(host.id)


def _consider(fu: FleetUpdate, strat: Strategy, row: FleetUpdateHost, host: Host | None, now) -> str:
    """Do what this host's turn calls for; return ``dispatched``, ``finished`` or ``failed`` (the row ended),
    ``queued`` (offline=wait), ``waiting`` (it stays pending: gated, or queued and still offline)
    or ``held`` (offline within its grace to reconnect: the hosts after it wait too, as the seed's
    sequential rollout did)."""
    if host is None:  # deleted before its turn
        _finish_row(row, "cancelled", "host deleted")
        return "finished"
    target = row.target_version or fu.target_version
    if host.agent_version == target:
        _finish_row(row, "skipped", None)
        return "finished"
    if may_dispatch_now(fu, row, host, now) is not None:
        return "waiting"  # gated (outside its windows): neither dispatched nor judged offline yet
    if not _online(host):
        return _offline(fu, strat, row, host, now)
    try:
        dispatch.dispatch_update(
            host.id,
            f"fleet:{fu.id}",
            fleet_host_row_id=row.id,
            version=row.target_version,  # a row's own target (a revert's); None: the server's version
            allow_downgrade=fu.kind == "revert",
        )
    except Refusal as refusal:
        db.session.rollback()
        row = db.session.get(FleetUpdateHost, row.id)
        if refusal.code == "already_current":
            _finish_row(row, "skipped", refusal.message)
            return "finished"
        if refusal.code == "host_offline":  # it went away between our look and the dispatch's
            return "waiting"
        _finish_row(row, "failed", refusal.message)
        return "failed"
    log.info("fleet update %s: dispatched host %s (wave %s)", fu.id, host.name, row.wave)
    return "dispatched"


def _offline(fu: FleetUpdate, strat: Strategy, row: FleetUpdateHost, host: Host, now) -> str:
    """An offline host's turn, by the rollout's ``offline`` policy."""
    if strat.offline == "wait":
        if row.waiting_since is None:
            row.waiting_since = now
            db.session.commit()
            log.info("fleet update %s: host %s is offline; queued until it comes back", fu.id, host.name)
            return "queued"
        deadline = strat.offline_deadline_s or 0
        if (now - row.waiting_since).total_seconds() >= deadline:
            _finish_row(row, "skipped", f"stayed offline past the {deadline:g} s deadline of offline=wait")
            return "finished"
        return "waiting"
    if _offline_grace_left(host) > 0:
        return "held"  # its hello wakes us; the periodic tick re-checks the grace
    grace = float(current_app.config["FLEET_OFFLINE_GRACE_S"])
    if strat.offline == "skip":
        _finish_row(row, "skipped", f"offline: skipped after the {grace:g} s grace to reconnect (offline=skip)")
    else:
        _finish_row(row, "failed", f"stayed offline past the {grace:g} s grace to reconnect")
        return "failed"
    return "finished"


def _first_stopping_row(fleet_id: int) -> FleetUpdateHost | None:
    """The first row that counts against the failure budget: a failed host, or one whose update was cut short.

    A host deleted during its update (its job ``cancelled``, "host deleted") counts like a failure:
    its update was started and did not end with the host updated, and the rollout cannot tell
    whether that had to do with the release. A deleted host that was still pending is passed
    over (it was never touched; see :func:`_consider`).
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
        .order_by(FleetUpdateHost.finished_at, FleetUpdateHost.position)
        .limit(1)
    )


def _settle_finished_rows() -> bool:
    """Copy terminal job states onto running fleet rows (any rollout, cancelled ones too).

    One query, on every tick: the running rows whose job ended, or whose job is gone (the host
    was deleted: such a row cannot finish by itself).
    """
    rows = db.session.execute(
        sa.select(FleetUpdateHost, Job)
        .outerjoin(Job, FleetUpdateHost.job_id == Job.id)
        .where(FleetUpdateHost.status == "running", sa.or_(Job.id.is_(None), Job.status != "running"))
    ).all()
    now = utcnow()
    for row, job in rows:
        if job is None:
            row.status, row.error, row.finished_at = "failed", "update job disappeared", now
            continue
        row.status = job.status if job.status in ("succeeded", "cancelled") else "failed"
        row.error = job.error
        row.finished_at = job.finished_at or now
    if rows:
        db.session.commit()
        return True
    return False


def host_connected(host_id: int) -> None:
    """Called on every agent hello: wake the rollout if it is waiting for this host to come back."""
    runtime().fleet_waker.wake_for(host_id)


def _offline_grace_left(host: Host) -> float:
    """Seconds this offline host still gets to reconnect before its offline policy applies.

    After a server restart every host is offline until its agent reconnects (with backoff), so
    the grace counts from the later of the host's last sighting and this server's start.
    """
    started = runtime().started_at
    since = max(t for t in (host.last_seen, started) if t is not None) if (host.last_seen or started) else utcnow()
    return float(current_app.config["FLEET_OFFLINE_GRACE_S"]) - (utcnow() - since).total_seconds()


def offline_waits(fu: FleetUpdate) -> dict[int, dict]:
    """The offline hosts a running rollout waits for, by host id: ``{"host_id", "name", "left_s", "policy"}``.

    ``left_s``: seconds before the offline policy applies (halt, skip) or, for a host queued by
    ``offline=wait``, before its deadline passes and it is recorded as skipped.
    """
    if fu.status != "running":
        return {}
    strat = Strategy.of(fu)
    r = FleetUpdateHost
    shape = _shape(fu.id)
    conds = [r.waiting_since.is_not(None)]
    if shape.wave is not None:
        conds.append(sa.and_(r.wave.between(shape.wave, _reach(shape, strat)), r.waiting_since.is_(None)))
    rows = db.session.execute(
        sa.select(r, Host)
        .join(Host, Host.id == r.host_id)
        .where(r.fleet_update_id == fu.id, r.status == "pending", sa.or_(*conds))
        .order_by(r.position)
    ).all()
    now = utcnow()
    out = {}
    for row, host in rows:
        if host.agent_version == (row.target_version or fu.target_version) or _online(host):
            continue
        if row.waiting_since is not None:
            left = (strat.offline_deadline_s or 0) - (now - row.waiting_since).total_seconds()
        else:
            left = _offline_grace_left(host)
        out[host.id] = {"host_id": host.id, "name": host.name, "left_s": max(0, round(left)), "policy": strat.offline}
    return out


def offline_wait(fu: FleetUpdate) -> dict | None:
    """The first offline host the rollout waits for (see :func:`offline_waits`), or None."""
    waits = offline_waits(fu)
    return next(iter(waits.values()), None)


def halt_reason(name: str, error: str | None) -> str:
    """``host <name>: <error>``, naming the host once: a refusal's message often names it already."""
    error = error or "update failed"
    if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", error):
        return error
    return f"host {name}: {error}"


def _finish_row(row: FleetUpdateHost, status: str, error: str | None) -> None:
    row.status, row.error, row.finished_at = status, error, utcnow()
    db.session.commit()


def _halt(fu: FleetUpdate, row: FleetUpdateHost | None, strat: Strategy, shape: _Shape) -> None:
    """Halt: no new dispatch (in-flight jobs finish and settle), the alert, the audit."""
    name = (row.name or str(row.host_id)) if row is not None else "?"
    first = halt_reason(name, row.error if row is not None else None)
    budget = strat.failure_budget(shape.total)
    if budget == 0:
        reason = first
    else:
        reason = (
            f"{shape.failures} hosts failed, over the failure budget of {budget} "
            f"(max_failures {strat.max_failures}); first: {first}"
        )
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fu.id, FleetUpdate.status == "running")
        .values(status="halted", finished_at=utcnow(), halt_reason=reason, hold_until=None)
    )
    if not res.rowcount:
        db.session.rollback()
        return
    AuditEvent.record(
        "system",
        "fleet.update_halted",
        f"fleet_update:{fu.id}",
        host=name,
        reason=reason,
        failures=shape.failures,
        failure_budget=budget,
        in_flight=shape.running,
    )
    Alert.raise_or_touch(
        "fleet_update_halted", HALT_DEDUP, f"Fleet update {fu.id} to {fu.target_version} halted at {reason}"
    )
    _announce_finished(fu.id)
    db.session.commit()
    log.warning("fleet update %s halted at %s (%d still in flight finish)", fu.id, reason, shape.running)


def _succeed(fu: FleetUpdate, shape: _Shape) -> None:
    res = db.session.execute(
        sa.update(FleetUpdate)
        .where(FleetUpdate.id == fu.id, FleetUpdate.status == "running")
        .values(status="succeeded", finished_at=utcnow(), hold_until=None)
    )
    if not res.rowcount:
        db.session.rollback()
        return
    AuditEvent.record(
        "system",
        "fleet.update_succeeded",
        f"fleet_update:{fu.id}",
        target_version=fu.target_version,
        failed=shape.failures,
    )
    Alert.resolve("fleet_update_halted", HALT_DEDUP)
    _announce_finished(fu.id)
    db.session.commit()
    log.info("fleet update %s succeeded", fu.id)


def correct_host_row(job_id: str, reason: str) -> None:
    """Carry a job corrected from succeeded to failed onto its rollout (in the caller's transaction).

    Subscribed to ``runtime().job_corrected``, which the watcher publishes inside that transaction.

    A running rollout then counts it against its failure budget at its next tick; one that
    already finished is marked halted now, with the alert, when the failure is over its budget,
    because its record must not claim a host it left on the old version.
    """
    row = db.session.scalar(
        sa.select(FleetUpdateHost).where(FleetUpdateHost.job_id == job_id, FleetUpdateHost.status == "succeeded")
    )
    if row is None:
        return
    row.status, row.error = "failed", reason
    fu = row.fleet_update
    if fu.status == "succeeded":
        db.session.flush()
        shape = _shape(fu.id)
        if shape.failures <= Strategy.of(fu).failure_budget(shape.total):
            return
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
            FleetUpdate.started_at,
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
    began = fu.started_at or fu.created_at  # a scheduled rollout's wall time starts at its start
    wall = (fu.finished_at - began).total_seconds() if fu.finished_at and began else None
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
