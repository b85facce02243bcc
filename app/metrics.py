"""Prometheus metrics: ``GET /metrics`` on the admin plane (an API token or a session), or on its
own address without authentication (``RM_METRICS_ADDR``, for a private interface).

Two kinds of figures:

- read from the database (and the connection registry) at each scrape, so every server process
  and every restart tells the same story: agents connected, hosts by agent version and state,
  the rollout's progress;
- counted in this process as things happen (they start at zero when it starts, as Prometheus
  counters do): update jobs by outcome, update duration, dispatch-to-command latency, frames
  refused by the rate limit, scheduler job durations.

Each app has its own registry (``metrics()``), so tests that build many apps never collide.
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app
from flask_login import current_user
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .extensions import db, login
from .runtime import runtime

log = logging.getLogger(__name__)

EXTENSION_KEY = "rm.metrics"

bp = Blueprint("metrics", __name__)

#: Seconds: an update takes from a few seconds (download, swap, restart) to its timeout.
UPDATE_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 90, 120, 300, 600)
#: Seconds: dispatch to the command on the wire is a transaction and a socket write.
DISPATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TICK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The registry of one app and its counted metrics."""

    def __init__(self, app: Flask):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.update_jobs = Counter(
            "rm_update_jobs",
            "Update jobs that ended, by outcome (succeeded, failed, cancelled).",
            ["outcome"],
            registry=r,
        )
        self.update_duration = Histogram(
            "rm_update_duration_seconds",
            "Dispatch to end of an update job.",
            ["outcome"],
            buckets=UPDATE_BUCKETS,
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "rm_update_dispatch_to_command_seconds",
            "From the update request (API, page, CLI or rollout) to the command.update frame written to the agent.",
            buckets=DISPATCH_BUCKETS,
            registry=r,
        )
        self.frames_rate_limited = Counter(
            "rm_agent_frames_rate_limited", "Agent frames dropped by the per-connection rate limit.", registry=r
        )
        self.scheduler_tick = Histogram(
            "rm_scheduler_tick_seconds",
            "Duration of one run of a background job.",
            ["job"],
            buckets=TICK_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(app))


class _StateCollector:
    """Figures read at scrape time from the database and the connection registry."""

    def __init__(self, app: Flask):
        self.app = app

    def describe(self):
        return []  # no describe-time read of the database

    def collect(self):
        from .models import FleetUpdate, FleetUpdateHost, Host

        with self.app.app_context():
            try:
                connected = GaugeMetricFamily("rm_agents_connected", "Agent sockets connected to this server process.")
                connected.add_metric([], len(runtime().connections.host_ids()))
                yield connected

                version = self.app.config["SERVER_VERSION"]
                hosts = GaugeMetricFamily(
                    "rm_hosts",
                    "Enrolled hosts by agent version, version state (current, behind, ahead, unknown) and "
                    "connection state (online, offline, revoked).",
                    labels=["agent_version", "version_state", "state"],
                )
                counts: dict[tuple[str, str, str], int] = {}
                for h in db.session.scalars(sa.select(Host)):
                    state = "revoked" if h.revoked_at is not None else ("online" if h.connected else "offline")
                    key = (h.agent_version or "", h.version_state(version), state)
                    counts[key] = counts.get(key, 0) + 1
                for key, n in sorted(counts.items()):
                    hosts.add_metric(list(key), n)
                yield hosts

                running = GaugeMetricFamily("rm_rollout_running", "1 while a fleet rollout is running.")
                progress = GaugeMetricFamily(
                    "rm_rollout_hosts",
                    "Hosts of the running (else the latest) fleet rollout, by their status in it.",
                    labels=["rollout", "status"],
                )
                fu = db.session.scalar(sa.select(FleetUpdate).order_by(FleetUpdate.id.desc()).limit(1))
                running.add_metric([], 1 if fu is not None and fu.status == "running" else 0)
                if fu is not None:
                    rows = db.session.execute(
                        sa.select(FleetUpdateHost.status, sa.func.count())
                        .where(FleetUpdateHost.fleet_update_id == fu.id)
                        .group_by(FleetUpdateHost.status)
                    ).all()
                    for status, n in sorted(rows):
                        progress.add_metric([str(fu.id), status], n)
                yield running
                yield progress
            finally:
                db.session.remove()


def init_app(app: Flask) -> Metrics:
    m = Metrics(app)
    app.extensions[EXTENSION_KEY] = m
    runtime(app).job_ended.subscribe(_on_job_ended)
    app.register_blueprint(bp)
    return m


def metrics(app: Flask | None = None) -> Metrics:
    return (app if app is not None else current_app).extensions[EXTENSION_KEY]


def _on_job_ended(job_id: str) -> None:
    """Count the ended job and its duration (subscribed to ``runtime().job_ended``)."""
    from .models import Job

    # Its own short connection: the publisher's session and transaction stay as they were.
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.select(Job.status, Job.created_at, Job.finished_at).where(Job.id == job_id, Job.kind == "update")
        ).first()
    if row is None:
        return
    status, created, finished = row
    m = metrics()
    m.update_jobs.labels(outcome=status).inc()
    if created is not None and finished is not None:
        m.update_duration.labels(outcome=status).observe(max(0.0, (finished - created).total_seconds()))


def observe_dispatch(started: float) -> None:
    """Record dispatch-to-command latency for a dispatch that began at ``time.perf_counter()`` ``started``."""
    metrics().dispatch_latency.observe(time.perf_counter() - started)


def count_rate_limited() -> None:
    metrics().frames_rate_limited.inc()


def exposition(app: Flask | None = None) -> bytes:
    return generate_latest(metrics(app).registry)


@bp.get("/metrics")
def scrape():
    """The metrics, for an API token (any role) or a logged-in session."""
    if not current_user.is_authenticated:
        return login.unauthorized()
    return Response(exposition(), content_type=CONTENT_TYPE_LATEST)


def start_listener(app: Flask, host: str, port: int):
    """Serve the metrics on their own address, unauthenticated; return the server (``.shutdown()``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, host, registry=metrics(app).registry)
    return server
