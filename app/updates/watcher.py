"""The update watcher: turns agent reports and deadlines into terminal job states.

The watcher knows nothing of rollouts: it announces ``runtime().job_ended`` after the commit
that ended a job (and ``job_corrected`` inside the one that un-counts a success), and the
fleet subscribes to both (``app/updates/__init__.py``).

Success is never taken from the agent's word: it is a ``hello`` at the target version after
the dispatch. Every transition claims the job atomically (``UPDATE ... WHERE status =
'running'``), so a hello, a failure report and the timeout sweep racing each other end the job
exactly once.

An agent's word is believed only about the job running on *its* host right now: a result or a
``last_update`` naming another job (a replayed command's cut download, say) changes nothing. A
job already counted a success is corrected only by a real rollback: the host back at the job's
``from_version``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time

import sqlalchemy as sa
from flask import current_app

from ..extensions import db
from ..models import Alert, AuditEvent, Host, Job, JobPhase
from ..oncommit import on_commit
from ..runtime import runtime
from ..timeutil import utcnow
from .inflight import InFlight

log = logging.getLogger(__name__)

#: A progress report repeating the phase last written for its job is written at most this often
#: (its bytes); a report of a new phase is always written, with its ``job_phases`` row.
PROGRESS_WRITE_S = 1.0


class ProgressGate:
    """Which progress reports to write: per job, the phase last written and when (monotonic).

    An agent downloading reports its bytes often; each report written was an UPDATE and a
    commit. The first report of every phase is written (the phase and when it began stay
    exact); further reports of the same phase within ``interval_s`` of the last written one are
    not, until one arrives after it. Per process: with several instances a host's reports reach
    the one holding its socket, and a process that has not written a job's phase writes it.
    """

    #: Jobs remembered at most (ended jobs are forgotten when they end; this bounds the rest).
    MAX_JOBS = 10_000

    def __init__(self, interval_s: float = PROGRESS_WRITE_S, clock=time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, float]] = {}

    def should_write(self, job_id: str, phase: str) -> bool:
        with self._lock:
            last = self._last.get(job_id)
        return last is None or last[0] != phase or self.clock() - last[1] >= self.interval_s

    def written(self, job_id: str, phase: str) -> None:
        with self._lock:
            if len(self._last) >= self.MAX_JOBS and job_id not in self._last:
                self._last.clear()
            self._last[job_id] = (phase, self.clock())

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._last.pop(job_id, None)


progress_gate = ProgressGate()


def _claim(job_id: str, **values) -> bool:
    now = utcnow()
    res = db.session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(updated_at=now, finished_at=now, **values)
    )
    return (res.rowcount or 0) == 1


def _host_name(host_id: int | None, job: Job | None = None) -> str:
    if job is not None and job.host_name:
        return job.host_name
    return db.session.scalar(sa.select(Host.name).where(Host.id == host_id)) or str(host_id)


def running_job_id(host_id: int) -> str | None:
    """The host's running update job, if any (the database, not the in-flight cache)."""
    return db.session.scalar(
        sa.select(Job.id).where(Job.host_id == host_id, Job.kind == "update", Job.status == "running")
    )


def succeed_job(job_id: str, host_id: int, version: str) -> bool:
    if not _claim_success(job_id, host_id, version):
        db.session.rollback()
        return False
    Alert.resolve("update_failed", str(host_id))
    db.session.commit()
    return True


def _claim_success(
    job_id: str, host_id: int, version: str, name: str | None = None, announce: list | None = None
) -> bool:
    """Claim the job succeeded and audit it, in the caller's transaction; announce it once that commits.

    ``announce``: collect the announcement's arguments there instead (the caller registers them).
    """
    if not _claim(job_id, status="succeeded", phase="done", error=None):
        return False
    name = name or _host_name(host_id)
    AuditEvent.record("system", "host.update_succeeded", name, host_id=host_id, job_id=job_id, version=version)
    if announce is None:
        on_commit(_succeeded, job_id, host_id, name, version)
    else:
        announce.append((job_id, host_id, name, version))
    return True


def _succeeded(job_id: str, host_id: int, name: str, version: str) -> None:
    runtime().inflight.discard(host_id, job_id)
    progress_gate.forget(job_id)
    log.info("update job %s succeeded: host %s now runs %s", job_id, name, version)
    runtime().job_ended.publish(job_id)


def fail_job(job_id: str, reason: str) -> bool:
    """Fail a running job with ``reason``, raise the host's alert; return False if it had ended."""
    job = db.session.get(Job, job_id)
    if job is None or not _claim(job_id, status="failed", error=reason[:2000]):
        db.session.rollback()
        return False
    name = _host_name(job.host_id, job)
    AuditEvent.record(
        "system",
        "host.update_failed",
        name,
        host_id=job.host_id,
        job_id=job_id,
        version=job.target_version,
        error=reason,
    )
    Alert.raise_or_touch(
        "update_failed",
        str(job.host_id),
        f"Agent update of {name} to {job.target_version} failed: {reason}",
        host_id=job.host_id,
    )
    db.session.commit()
    runtime().inflight.discard(job.host_id, job_id)
    progress_gate.forget(job_id)
    log.warning("update job %s for host %s failed: %s", job_id, name, reason)
    runtime().job_ended.publish(job_id)
    return True


def on_host_removed(host_id: int, reason: str, cancelled_job: str | None) -> None:
    """A host was revoked, got a new token or was deleted (``runtime().host_removed``): end its update now.

    A deleted host's job was already ended ``cancelled`` in the deletion's transaction; a revoked
    host's running job fails with the reason, since that host can no longer finish it.
    """
    if cancelled_job is not None:
        runtime().inflight.discard(host_id, cancelled_job)
        log.warning("update job %s for host %s cancelled: %s", cancelled_job, host_id, reason)
        runtime().job_ended.publish(cancelled_job)
        return
    job_id = running_job_id(host_id)
    if job_id is not None:
        fail_job(job_id, reason)


@dataclasses.dataclass
class HelloContext:
    """One ``hello`` on its way through the presence writer (app/agents/presence.py)."""

    data: dict
    succeeded: bool = False  # :func:`succeed_with_hellos` ended its job with the hello's commit
    #: Set by :func:`hellos_to_reconcile` in the hello's transaction: ``entry`` is the host's
    #: running update job then (None: none), ``open_alert`` whether an update_failed alert was open.
    checked: bool = False
    entry: InFlight | None = None
    open_alert: bool = True


def _judge(entry, data: dict) -> tuple[bool, bool]:
    """Does this hello correct an earlier success, and does it succeed its host's running job?"""
    last = data.get("last_update") or {}
    corrects = bool(
        last.get("outcome") in ("failed", "rolled_back")
        and last.get("job_id")
        and (entry is None or entry.job_id != last["job_id"])
    )
    return corrects, entry is not None and data["agent_version"] == entry.target_version and not corrects


def succeed_with_hellos(hellos: list) -> None:
    """The presence writer's hello hook: end the jobs these hellos succeed, in the hellos' own transaction.

    A hello at its job's target is the job's success. Claimed here, the success is one more
    statement or two in the writer's group commit (no transaction of its own per host) and is on
    record before the agent is welcomed. Any other hello is left to :func:`on_hello`.

    The writer runs this in a savepoint: if it fails, nothing of it is announced or marked, the
    hellos are still recorded, and :func:`on_hello` handles each of them the old way.
    """
    server = current_app.config["SERVER_VERSION"]
    resolved, announce, handled = [], [], []
    hellos = [(h, ctx) for h, ctx in hellos if isinstance(ctx, HelloContext)]
    if all(ctx.checked for _, ctx in hellos):  # read by hellos_to_reconcile in this transaction
        entries = {h: ctx.entry for h, ctx in hellos if ctx.entry is not None}
    else:
        entries = runtime().inflight.get_many(h for h, _ in hellos)  # one query for the batch, uncached
    for host_id, ctx in hellos:
        entry = entries.get(host_id)
        if not _judge(entry, ctx.data)[1]:
            continue
        version = ctx.data["agent_version"]
        # the job resolves the host's alert; a job ended meanwhile does so only for the server's version
        if _claim_success(entry.job_id, host_id, version, entry.host_name, announce) or version == server:
            resolved.append(str(host_id))
        handled.append(ctx)
    if resolved:
        Alert.resolve_many("update_failed", resolved)
    for args in announce:  # only now: every statement above went through
        on_commit(_succeeded, *args)
    for ctx in handled:
        ctx.succeeded = True


def hellos_to_reconcile(hellos: list) -> list:
    """The read before the presence writer writes a batch of hellos: which need :func:`succeed_with_hellos`.

    One query for the batch's running update jobs and one for their open ``update_failed``
    alerts, recorded in each hello's context. :func:`on_hello` then needs no query of its own for
    a host with neither, which is every host of a reconnect storm: three statements per welcome
    (the job, the alert, a commit) on the connection's thread become two per batch.
    """
    hellos = [(h, ctx) for h, ctx in hellos if isinstance(ctx, HelloContext)]
    if not hellos:
        return []
    entries = runtime().inflight.get_many(h for h, _ in hellos)
    server = current_app.config["SERVER_VERSION"]
    at_server = [str(h) for h, ctx in hellos if ctx.data["agent_version"] == server]
    alerts = Alert.open_keys("update_failed", at_server) if at_server else set()
    for h, ctx in hellos:
        ctx.checked, ctx.entry, ctx.open_alert = True, entries.get(h), str(h) in alerts
    return [(h, ctx) for h, ctx in hellos if ctx.entry is not None]


succeed_with_hellos.select = hellos_to_reconcile  # the presence writer's read first (app/agents/presence.py)


def on_hello(host_id: int, data: dict, ctx: HelloContext | None = None) -> None:
    """Reconcile a ``hello`` with the host's in-flight update, if any (unless its commit did already)."""
    if ctx is not None and ctx.succeeded:
        return
    version = data["agent_version"]
    checked = ctx is not None and ctx.checked  # as of the hello's commit (hellos_to_reconcile)
    entry = ctx.entry if checked else runtime().inflight.get(host_id)
    last = data.get("last_update") or {}
    corrects, succeeds = _judge(entry, data)
    # A hello that succeeds its job resolves the alert in that job's transaction: no second one.
    if version == current_app.config["SERVER_VERSION"] and not succeeds and (not checked or ctx.open_alert):
        # The condition behind an update_failed alert has cleared, whoever fixed it.
        Alert.resolve("update_failed", str(host_id))
        db.session.commit()
    if corrects:
        _correct_success(last["job_id"], host_id, last, version)
    if entry is None:
        return
    if version == entry.target_version:
        ended_meanwhile = not succeed_job(entry.job_id, host_id, version)
        if ended_meanwhile and succeeds and version == current_app.config["SERVER_VERSION"]:
            Alert.resolve("update_failed", str(host_id))  # as above: the job did not resolve it
            db.session.commit()
    elif last.get("job_id") == entry.job_id and last.get("outcome") not in (None, "swapped", "committed"):
        fail_job(entry.job_id, f"agent reported {last.get('outcome')}: {last.get('error') or 'no reason given'}")
    elif entry.restarting:
        fail_job(
            entry.job_id,
            f"agent restarted but came back at version {version} instead of {entry.target_version}",
        )
    elif runtime().cluster is not None and entry.phase == "dispatched":
        # Several instances: the command may have been routed to an instance that died before
        # sending it. The row is the command: send it again (an agent that has it ignores it).
        runtime().update_routed.publish(entry.job_id)
    # Otherwise the link merely blipped before the swap; the agent's own report or the
    # deadline decides the job.


def _correct_success(job_id: str, host_id: int, last: dict, version: str) -> None:
    """A job already counted a success was rolled back on the host afterwards: say so.

    The new program said hello (success), then lost the link before it could commit, and its
    probation window restored the previous program. The record must not keep claiming success.
    Only a real rollback counts: the host says hello at the job's ``from_version`` again. A
    failure reported by a host still at the target (a replayed command whose download was cut)
    is not about this job's outcome and changes nothing.
    """
    job = db.session.scalar(sa.select(Job).where(Job.id == job_id, Job.host_id == host_id, Job.status == "succeeded"))
    from_version = (job.params or {}).get("from_version") if job is not None else None
    if job is None or version != from_version or version == job.target_version:
        if job is not None:
            log.info(
                "host %s at %s reports %s for job %s, which took it from %s to %s: not a rollback; ignored",
                host_id,
                version,
                last.get("outcome"),
                job_id,
                from_version,
                job.target_version,
            )
        db.session.rollback()
        return
    reason = f"rolled back after its hello at the target: {last.get('error') or last.get('outcome')}"
    res = db.session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.host_id == host_id, Job.status == "succeeded")
        .values(status="failed", error=reason[:2000], updated_at=utcnow())
    )
    if not res.rowcount:
        db.session.rollback()
        return
    name = _host_name(host_id, job)
    AuditEvent.record(
        "system", "host.update_failed", name, host_id=host_id, job_id=job_id, version=job.target_version, error=reason
    )
    Alert.raise_or_touch(
        "update_failed",
        str(host_id),
        f"Agent update of {name} to {job.target_version} failed: {reason}",
        host_id=host_id,
    )
    runtime().job_corrected.publish(job_id, reason)  # e.g. the rollout that counted it: same transaction
    db.session.commit()
    log.warning("update job %s for host %s: %s", job_id, name, reason)
    runtime().job_ended.publish(job_id)


@dataclasses.dataclass(frozen=True)
class _Progress:
    host_id: int
    job_id: str
    phase: str
    done: int
    total: int
    at: dt.datetime


def on_progress(host_id: int, data: dict) -> None:
    """Queue the report for the presence writer (app/agents/presence.py), which writes it in batches.

    Written one by one, each report was an UPDATE, an INSERT and a commit on the connection's
    thread: a third of the server's CPU in a rollout of 1,000 hosts at 50 in flight. Nothing
    waits for the write; the row stays the truth (the write applies only while the job is still
    running on this host), and a hello queued after the report is committed with it or after it.
    """
    job_id = data["job_id"]
    phase = data["phase"]
    if not progress_gate.should_write(job_id, phase):
        return  # the same phase as the report written less than PROGRESS_WRITE_S ago
    progress_gate.written(job_id, phase)
    if phase == "restarting":
        runtime().inflight.mark_restarting(host_id, job_id)  # only if it is the host's running job
    # the protocol bounds the byte counts to BIGINT
    item = _Progress(host_id, job_id, phase, data["bytes_done"], data["bytes_total"], utcnow())
    runtime().presence.queue(write_progress, item)


_JOBS = Job.__table__
_PHASES = JobPhase.__table__
#: The bound values of one report, each used wherever the statements below need it.
_B = {
    "p_job": sa.bindparam("p_job", type_=_JOBS.c.id.type),
    "p_host": sa.bindparam("p_host", type_=_JOBS.c.host_id.type),
    "v_phase": sa.bindparam("v_phase", type_=_JOBS.c.phase.type),
    "v_done": sa.bindparam("v_done", type_=_JOBS.c.bytes_done.type),
    "v_total": sa.bindparam("v_total", type_=_JOBS.c.bytes_total.type),
    "v_at": sa.bindparam("v_at", type_=_JOBS.c.updated_at.type),
}
_RUNNING = (_JOBS.c.id == _B["p_job"], _JOBS.c.host_id == _B["p_host"], _JOBS.c.status == "running")
#: One report: the job's phase and bytes, while it runs on the reporting host.
_UPDATE_PROGRESS = (
    sa.update(_JOBS)
    .where(*_RUNNING)
    .values(phase=_B["v_phase"], bytes_done=_B["v_done"], bytes_total=_B["v_total"], updated_at=_B["v_at"])
)
#: The first report of a phase is when it began (the run report): one row per job and phase.
_ENTER_PHASE = sa.insert(_PHASES).from_select(
    ["job_id", "phase", "at"],
    sa.select(_B["p_job"], _B["v_phase"], _B["v_at"]).where(
        ~sa.select(_PHASES.c.id).where(_PHASES.c.job_id == _B["p_job"], _PHASES.c.phase == _B["v_phase"]).exists(),
        sa.select(_JOBS.c.id).where(*_RUNNING).exists(),
    ),
)


def write_progress(items: list[_Progress]) -> None:
    """Write queued progress reports: two statements for the batch, in the presence writer's transaction."""
    latest: dict[str, _Progress] = {}
    first: dict[tuple[str, str], _Progress] = {}
    for it in items:
        latest[it.job_id] = it
        first.setdefault((it.job_id, it.phase), it)

    def params(it: _Progress) -> dict:
        return {
            "p_job": it.job_id,
            "p_host": it.host_id,
            "v_phase": it.phase,
            "v_done": it.done,
            "v_total": it.total,
            "v_at": it.at,
        }

    db.session.execute(_UPDATE_PROGRESS, [params(it) for it in latest.values()])
    db.session.execute(_ENTER_PHASE, [params(it) for it in first.values()])
    on_commit(_log_progress, items)


def _log_progress(items: list[_Progress]) -> None:
    for it in items:
        log.info("update job %s: phase %s (%d/%d bytes)", it.job_id, it.phase, it.done, it.total)


def on_result(host_id: int, data: dict) -> None:
    job_id = data["job_id"]
    if running_job_id(host_id) != job_id:
        # Another host's job, a finished one, or a replay's: none of them is this report's to end.
        log.info("host %s reported on job %s, which is not running on it; ignored", host_id, job_id)
        return
    if data["ok"]:
        # Not success: that is only ever a hello at the target. Note it and keep waiting.
        log.info("host %s says job %s went well; waiting for its hello", host_id, job_id)
        return
    fail_job(job_id, data["error"] or "agent reported failure without a reason")


def sweep_timeouts() -> int:
    """Fail every running update job whose deadline has passed; return how many."""
    now = utcnow()
    rows = db.session.execute(
        sa.select(Job.id, Job.params, Job.created_at, Job.deadline).where(
            Job.kind == "update", Job.status == "running", Job.deadline < now
        )
    ).all()
    n = 0
    for job_id, params, created_at, deadline in rows:
        waited = (deadline - created_at).total_seconds()
        if fail_job(job_id, f"timed out after {waited:.0f} s waiting for version {params.get('version')}"):
            n += 1
    return n
