"""A finished (or running) rollout written straight into the database, for the run report's tests and bench.

The rows are what the engine and the watcher leave behind (``fleet_updates``, ``fleet_update_hosts``,
``jobs``, ``job_phases``) at known times, so the report's arithmetic can be checked against known
answers; the live-agent test checks the same report over a rollout the real engine ran.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa


@dataclass
class Line:
    """One host of a seeded rollout; times are seconds after the rollout's start."""

    name: str
    outcome: str = "succeeded"  # a fleet_update_hosts status (``pending`` with wait_s: waiting)
    wave: int = 0
    dispatch_s: float | None = 0.0  # None: never dispatched (pending, skipped)
    took_s: float | None = 10.0  # None: still running
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds after the dispatch
    error: str | None = None
    wait_s: float | None = None  # waited offline from this many seconds after the start
    record_phases: bool = True  # False: a job from before job_phases existed


def seed_rollout(
    lines: list[Line],
    start: dt.datetime,
    status: str = "succeeded",
    target: str = "2.0.0",
    took_s: float | None = None,
    halt_reason: str | None = None,
) -> int:
    """Write a rollout of ``lines`` (new hosts named as given) started at ``start``; return its id."""
    from app.extensions import db
    from app.models import FleetUpdate, FleetUpdateHost, Host, Job, JobPhase

    def at(s: float | None) -> dt.datetime | None:
        return None if s is None else start + dt.timedelta(seconds=s)

    fu = FleetUpdate(
        target_version=target,
        status=status,
        created_by="admin",
        created_at=start,
        started_at=start,
        finished_at=at(took_s),
        halt_reason=halt_reason,
    )
    db.session.add(fu)
    db.session.flush()
    host_ids = db.session.scalars(
        sa.insert(Host).returning(Host.id, sort_by_parameter_order=True),
        [{"name": ln.name, "agent_version": "1.0.0", "capabilities": ["update"], "labels": {}} for ln in lines],
    ).all()
    jobs, rows, phases = [], [], []
    for pos, (ln, host_id) in enumerate(zip(lines, host_ids, strict=True)):
        job_id = None
        dispatched = at(ln.dispatch_s)
        finished = None
        if ln.dispatch_s is not None:
            job_id = str(uuid.uuid4())
            finished = at(ln.dispatch_s + ln.took_s) if ln.took_s is not None else None
            last = max(ln.phases, key=ln.phases.get) if ln.phases else "dispatched"
            if ln.outcome == "succeeded":
                last = "done"
            jobs.append(
                {
                    "id": job_id,
                    "host_id": host_id,
                    "host_name": ln.name,
                    "kind": "update",
                    "status": "running" if finished is None else ("failed" if ln.outcome == "failed" else ln.outcome),
                    "phase": last,
                    "params": {"version": target, "from_version": "1.0.0"},
                    "error": ln.error,
                    "actor": f"fleet:{fu.id}",
                    "created_at": dispatched,
                    "updated_at": finished or dispatched,
                    "finished_at": finished,
                }
            )
            if ln.record_phases:
                phases += [{"job_id": job_id, "phase": p, "at": at(ln.dispatch_s + s)} for p, s in ln.phases.items()]
        elif ln.outcome in ("skipped", "cancelled"):
            finished = at(ln.took_s or 0.0)
        rows.append(
            {
                "fleet_update_id": fu.id,
                "host_id": host_id,
                "host_name": ln.name,
                "position": pos,
                "wave": ln.wave,
                "status": ln.outcome,
                "job_id": job_id,
                "error": ln.error,
                "started_at": dispatched,
                "finished_at": finished,
                "from_version": "1.0.0",
                "waiting_since": at(ln.wait_s),
            }
        )
    if jobs:
        db.session.execute(sa.insert(Job), jobs)
    db.session.execute(sa.insert(FleetUpdateHost), rows)
    if phases:
        db.session.execute(sa.insert(JobPhase), phases)
    db.session.commit()
    return fu.id


def big_rollout(n: int, start: dt.datetime, per_wave: int = 50, failures_every: int = 97) -> int:
    """``n`` hosts in waves of ``per_wave``: each wave starts when the last one ends; some fail, some wait."""
    lines = []
    for i in range(n):
        wave, k = divmod(i, per_wave)
        t0 = wave * 40.0 + (k % 10) * 0.5
        failed = i % failures_every == failures_every - 1
        lines.append(
            Line(
                name=f"host-{i:04d}",
                wave=wave,
                outcome="failed" if failed else "succeeded",
                dispatch_s=t0,
                took_s=12.0 + (i % 17),
                phases={
                    "downloading": 0.2,
                    "verifying": 3.0 + (i % 5),
                    "staging": 4.5 + (i % 5),
                    "restarting": 6.0 + (i % 5),
                },
                error=f"timed out after {90 + i % 3} s waiting for version 2.0.0" if failed else None,
                wait_s=t0 - 5.0 if i % 211 == 5 else None,
            )
        )
    return seed_rollout(lines, start, took_s=(n // per_wave + 1) * 40.0)
