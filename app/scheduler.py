"""The background jobs: update timeout sweep, fleet rollout tick, offline sweep.

One scheduler per deployment: only ``restic-manager serve`` starts it, never a WSGI import.
Each job runs one unit of work inside an app context and logs (never raises) on failure.
With several instances on PostgreSQL every instance runs the scheduler, but the timeout sweep
and the rollout tick do their work only on the leader (``app.cluster``); the offline sweep is
each instance's own (its own hosts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from flask import Flask

from .extensions import db
from .metrics import metrics
from .runtime import runtime

log = logging.getLogger(__name__)


def _in_context(app: Flask, fn: Callable[[], object], name: str, leader_only: bool = False) -> Callable[[], None]:
    rt = runtime(app)

    def run() -> None:
        if leader_only and rt.cluster is not None and not rt.cluster.leader:
            return
        started = time.perf_counter()
        with app.app_context():
            try:
                fn()
            except Exception:  # noqa: BLE001 - top of a long-running loop: log and go on
                log.exception("background job %s failed", name)
                db.session.rollback()
            finally:
                db.session.remove()
                metrics(app).scheduler_tick.labels(job=name).observe(time.perf_counter() - started)

    return run


def start(app: Flask) -> BackgroundScheduler:
    from .agents.link import sweep_offline
    from .updates import fleet, schedule, watcher

    sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
    timeout = float(app.config["UPDATE_TIMEOUT"])
    sweep_every = max(0.05, min(1.0, timeout / 20))
    sched.add_job(
        _in_context(app, watcher.sweep_timeouts, "update_timeouts", leader_only=True),
        "interval",
        seconds=sweep_every,
        id="update_timeouts",
    )
    sched.add_job(
        _in_context(app, schedule.run_ticks, "fleet_tick", leader_only=True),  # scheduled starts, then the rollout
        "interval",
        seconds=app.config["FLEET_TICK_S"],
        id=fleet.TICK_JOB_ID,
    )
    sched.add_job(
        _in_context(app, sweep_offline, "offline_sweep"),
        "interval",
        seconds=app.config["OFFLINE_SWEEP_S"],
        id="offline_sweep",
    )
    rt = runtime(app)
    rt.scheduler = sched
    if rt.cluster is not None:  # a new leader looks at the rollout at once, not at the next interval
        rt.cluster.on_leadership.append(rt.fleet_waker.wake)
    sched.start()
    return sched
