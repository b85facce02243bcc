"""Dispatch one host's agent update: pre-checks, the job, the audit event, ``command.update``."""

from __future__ import annotations

import datetime as dt
import logging
import time

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.exc import IntegrityError

from agent import protocol

from .. import hosts
from ..errors import Refusal
from ..extensions import db
from ..metrics import observe_dispatch
from ..models import AgentRelease, AuditEvent, FleetUpdateHost, Host, Job
from ..runtime import runtime
from ..timeutil import utcnow
from . import releases, watcher
from .inflight import InFlight

log = logging.getLogger(__name__)


def cannot_update_message(host: Host) -> str:
    """Why the agent on ``host`` cannot update itself, as precisely as its hello told us.

    An agent of this version says why in its hello (``update_unavailable``, docs/protocol.md); the
    reason is known while it is connected to this process. An agent that says nothing is an old one.
    """
    conn = runtime().connections.get(host.id)
    why = getattr(conn, "update_unavailable", None) if conn is not None else None
    agent = f"the agent on {host.name} ({host.agent_version or 'unknown version'})"
    if why == protocol.UPDATE_UNAVAILABLE_NO_KEY:
        return (
            f"{agent} cannot update itself: it has no release key pinned. Configure the release key on the "
            "server (RM_RELEASE_PUBLIC_KEY) and re-run the install one-liner, which then carries --release-key, "
            "or add release_public_key to the agent's config and restart it"
        )
    if why == protocol.UPDATE_UNAVAILABLE_NOT_REPLACEABLE:
        return (
            f"{agent} cannot update itself: it does not run from a program file in a directory it may write "
            "(not installed by install-agent.sh); install the agent with the install one-liner"
        )
    if why:
        return f"{agent} cannot update itself: {why}"
    if conn is None:
        return (
            f"{agent} did not announce the 'update' capability when it last connected: it may have no release "
            "key pinned, not run from a replaceable program file, or be too old to update itself"
        )
    return (
        f"{agent} does not announce the 'update' capability and does not say why: it is an old agent that "
        "cannot update itself; install the new agent by hand once (the install one-liner)"
    )


def precheck(host: Host, allow_downgrade: bool = False, target: str | None = None) -> Refusal | None:
    """Return why ``host`` cannot be updated to ``target`` (the server's version) now, or None if it can.

    A running update is checked first: while its agent restarts the host is briefly offline, and
    the answer to a second request is that the update is under way, not that the host is gone.
    """
    if host.revoked_at is not None:
        return Refusal(
            409, "host_revoked", f"the agent token of {host.name} is revoked; issue a new token to reconnect it"
        )
    if watcher.running_job_id(host.id) is not None:  # an id only: the pre-check just asks
        return Refusal(409, "update_in_progress", f"an update of {host.name} is already running")
    if not host.connected or not runtime().connections.is_connected(host.id):
        return Refusal(409, "host_offline", f"host {host.name} is offline")
    server = current_app.config["SERVER_VERSION"]
    target = target or server
    state = host.version_state(target)
    if state == "current":
        return Refusal(409, "already_current", f"host {host.name} already runs {target}")
    if state == "ahead" and not allow_downgrade:
        whose = "the server's " if target == server else ""
        return Refusal(
            409,
            "already_current",
            f"host {host.name} runs {host.agent_version}, newer than {whose}{target}; "
            "ask for allow_downgrade to roll it back",
        )
    if not host.can_update():
        return Refusal(422, "agent_cannot_update", cannot_update_message(host))
    return None


def update_frame(job: Job, signature: str | None) -> str:
    """The ``command.update`` frame of a running update job, from its row."""
    return _frame(job.id, job.host_id, job.params, signature)


def _frame(job_id: str, host_id: int, p: dict, signature: str | None) -> str:
    data = {
        "job_id": job_id,
        "host_id": host_id,  # the agent refuses a command naming another host (a misdirected replay)
        "version": p["version"],
        "url": p["url"],
        "sha256": p["sha256"],
        "size": p["size"],
        "platform": p["platform"],
    }
    if signature:
        data["signature"] = signature
    if p.get("allow_downgrade"):
        data["allow_downgrade"] = True
    return protocol.encode("command.update", data)


def _route_to_holder(host_id: int, job_id: str) -> bool:
    """Several instances: the host's socket is on a peer, so notify it in the job's own transaction.

    The notification carries only the job id and is delivered only if the job commits; the peer
    reads the row and sends the command (:func:`deliver`). Never on SQLite (no cluster).
    """
    rt = runtime()
    if rt.cluster is None or rt.connections.get(host_id) is not None:
        return False
    return rt.cluster.route(host_id, "update", job_id)


#: A routed job's row and its release's signature in one statement (PostgreSQL, psycopg's parameter
#: style): what :func:`deliver` reads on the cluster listener's own autocommit connection.
ROUTED_JOB_SQL = (
    "SELECT j.host_id, j.params, r.signature FROM jobs j LEFT JOIN agent_releases r "
    "ON r.version = j.params ->> 'version' AND r.platform = j.params ->> 'platform' "
    "WHERE j.id = %(id)s AND j.kind = 'update' AND j.status = 'running' AND j.phase = 'dispatched' "
    "AND j.host_id IS NOT NULL"
)


def deliver(job_id: str, read=None) -> None:
    """Send a running job's ``command.update`` on this process's socket for its host.

    Subscribed to ``runtime().update_routed``: a peer instance dispatched the job, or the agent said
    hello with its job still undelivered. Only a job still ``dispatched`` (the agent has not
    reported on it) is sent; an agent that already has it ignores the repeat. A host that is not
    connected here gets it with its next hello; the job's deadline decides otherwise.

    ``read(sql, params)``, when given, runs one statement and returns its first row: the cluster's
    listener passes its own connection, so a routed command costs one round trip to the database
    (no pool checkout, ping, BEGIN or ROLLBACK) between the notification and the frame.
    """
    if read is not None:
        row = read(ROUTED_JOB_SQL, {"id": job_id})
        if row is None:
            return
        host_id, frame = row[0], _frame(job_id, row[0], row[1], row[2])
    else:
        job = db.session.get(Job, job_id)
        if job is None or job.status != "running" or job.phase != "dispatched" or job.host_id is None:
            return
        signature = db.session.scalar(
            sa.select(AgentRelease.signature).where(
                AgentRelease.version == job.params["version"], AgentRelease.platform == job.params["platform"]
            )
        )
        db.session.close()
        host_id, frame = job.host_id, update_frame(job, signature)
    if runtime().connections.send(host_id, frame):
        log.info("update job %s: command sent to host %s", job_id, host_id)
    else:
        log.info(
            "update job %s: host %s is not connected here; it gets the command with its next hello", job_id, host_id
        )


def dispatch_update(
    host_id: int,
    actor: str,
    fleet_host_row_id: int | None = None,
    allow_downgrade: bool = False,
    version: str | None = None,
) -> Job:
    """Start updating ``host_id`` to ``version`` (the server's own by default); raise :class:`Refusal` if it can't.

    Another ``version`` than the server's is a revert to a release the server kept
    (:func:`releases.kept_release`); it needs ``allow_downgrade`` when it is older than the host's.

    The job, its audit event and (for a rollout) the fleet row are written in one transaction,
    so a crash can never leave a sent command without its job, nor a fleet row without its job.
    """
    started = time.perf_counter()
    host = hosts.get(host_id)
    refusal = precheck(host, allow_downgrade, version)
    if refusal is not None:
        raise refusal
    release = releases.current_release() if version is None else releases.kept_release(version)
    if release is None:
        wanted = version or current_app.config["SERVER_VERSION"]
        raise Refusal(503, "release_unavailable", f"no agent artifact is registered for {wanted}")
    now = utcnow()
    timeout = float(current_app.config["UPDATE_TIMEOUT"])
    job = Job(
        host_id=host.id,
        host_name=host.name,
        kind="update",
        status="running",
        phase="dispatched",
        actor=actor,
        created_at=now,
        updated_at=now,
        deadline=now + dt.timedelta(seconds=timeout),
        params={
            "version": release.version,
            "from_version": host.agent_version,
            "platform": release.platform,
            "sha256": release.sha256,
            "size": release.size,
            "url": releases.download_path(release),
            "timeout_s": timeout,
            "allow_downgrade": allow_downgrade,
        },
    )
    db.session.add(job)
    try:
        db.session.flush()
        AuditEvent.record(
            actor, "host.update_dispatched", host.name, host_id=host.id, job_id=job.id, version=release.version
        )
        if fleet_host_row_id is not None:
            db.session.execute(
                sa.update(FleetUpdateHost)
                .where(FleetUpdateHost.id == fleet_host_row_id)
                .values(status="running", job_id=job.id, started_at=now, from_version=host.agent_version)
            )
        routed = _route_to_holder(host.id, job.id)
        # What is needed after the commit, from the objects in hand: the commit expires them, and
        # reading them again would cost a SELECT each (job, host, release) per dispatch.
        entry = InFlight(job.id, host.id, release.version, job.deadline, host_name=host.name)
        name = host.name
        frame = None if routed else update_frame(job, release.signature)
        # The job as written is also the answer: kept out of the commit's expiry, the caller's
        # to_dict() costs no second transaction (a checkout, BEGIN, SELECT and ROLLBACK).
        db.session.expunge(job)
        db.session.commit()
    except IntegrityError:
        # The partial unique index refused a second running update job for this host.
        db.session.rollback()
        raise Refusal(409, "update_in_progress", "an update of this host is already running") from None
    runtime().inflight.add(entry)

    if routed:
        log.info("update job %s for host %s: its command goes out on the instance holding the host", entry.job_id, name)
    elif runtime().connections.send(entry.host_id, frame):
        observe_dispatch(started)
    else:
        watcher.fail_job(entry.job_id, "the agent disconnected before the update command was delivered")
        job = db.session.get(Job, entry.job_id)
    log.info("dispatched update job %s for host %s to %s", entry.job_id, name, entry.target_version)
    return job
