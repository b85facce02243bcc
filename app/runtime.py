"""The server's runtime state, one object per app: ``runtime()`` is the only way to reach it.

Everything that lives in memory rather than in the database — the live connections, the
in-flight update cache, the clock, the scheduler and the notifier once started, the fleet's
wake-ups and the announcements ("job ended", "alert raised", "rollout finished") — hangs off
:class:`Runtime`, built by ``create_app`` and stored at ``app.extensions["rm.runtime"]``.
This module imports nothing from the app, so any module may import it without tying a knot.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

log = logging.getLogger(__name__)

EXTENSION_KEY = "rm.runtime"
#: The scheduler job the fleet waker nudges.
FLEET_TICK_JOB_ID = "fleet_tick"


class Announcement:
    """A tiny publish/subscribe hook: subscribers are called in order, in the publisher's thread."""

    def __init__(self, name: str):
        self.name = name
        self._subscribers: list[Callable[..., Any]] = []

    def subscribe(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self._subscribers.append(fn)
        return fn

    def publish(self, *args: Any) -> None:
        for fn in list(self._subscribers):
            fn(*args)


class Waker:
    """Wake-ups for one periodic scheduler job, never lost.

    :meth:`wake` (from any thread) marks a run as wanted and moves the job's next run to now;
    :meth:`run` repeats its step while wake-ups arrived during it. ``waiting_for`` names the
    hosts whose reconnect should wake the job (offline hosts the fleet rollout waits for).
    """

    def __init__(self, job_id: str, scheduler: Callable[[], Any]):
        self.job_id = job_id
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._pending = False
        self._running = False  # run() is looping: a wake-up only needs the pending flag
        self.waiting_for: frozenset[int] = frozenset()  # replaced whole, never mutated: no lock

    def wake(self) -> None:
        with self._lock:
            self._pending = True
            if self._running:
                return  # run() sees the flag before it stops: no scheduler call (50 job ends at once)
        sched = self._scheduler()
        if sched is not None and sched.running:
            try:
                sched.modify_job(self.job_id, next_run_time=dt.datetime.now(sched.timezone))
            except Exception:  # noqa: BLE001 - a lost nudge is covered by the loop in run()
                log.debug("could not nudge scheduler job %s", self.job_id, exc_info=True)

    def wake_for(self, host_id: int) -> None:
        """A host reconnected: wake the job if it is waiting for that host."""
        if host_id in self.waiting_for:
            self.wake()

    def run(self, step: Callable[[], None]) -> None:
        """Run ``step`` until no wake-up arrived while it ran."""
        while True:
            with self._lock:
                self._pending = False
                self._running = True
            try:
                step()
            except BaseException:
                with self._lock:
                    self._running = False
                raise
            with self._lock:
                if not self._pending:
                    self._running = False
                    return


class Runtime:
    """In-memory state of one app; the registries are caches of the database, never the record."""

    def __init__(self, connections, inflight, clock, downloads, presence=None):
        self.connections = connections  # app.agents.registry.ConnectionRegistry
        self.presence = presence  # app.agents.presence.Presence: hosts' online state, written in batches
        self.inflight = inflight  # app.updates.inflight.InFlightRegistry
        self.downloads = downloads  # app.agents.downloads.ActiveDownloads: artifact streams per host
        self.clock = clock  # app.timeutil.Clock (a FakeClock in tests)
        self.scheduler = None  # the BackgroundScheduler, once ``serve`` started it
        self.started_at: dt.datetime | None = None  # when ``serve`` prepared this process
        self.fleet_waker = Waker(FLEET_TICK_JOB_ID, lambda: self.scheduler)
        #: Published after the commit that ended an update job: ``(job_id)``.
        self.job_ended = Announcement("job_ended")
        #: Published inside the transaction that turns a succeeded job into a failed one:
        #: ``(job_id, reason)``; subscribers write in that same transaction.
        self.job_corrected = Announcement("job_corrected")
        #: Published after the commit that revoked or replaced a host's token or deleted the host, once its
        #: connection and downloads are cut: ``(host_id, reason, cancelled_job_id or None)``.
        self.host_removed = Announcement("host_removed")
        #: Published after the commit that opened a new alert: ``(alert.to_dict() + host name)``.
        self.alert_raised = Announcement("alert_raised")
        #: Published after the commit that ended a rollout (succeeded, halted, cancelled): ``(summary)``.
        self.fleet_finished = Announcement("fleet_finished")
        self.notifier = None  # app.notify.Notifier: built by create_app, its thread started by ``serve``
        #: On PostgreSQL, ``serve`` makes this process an instance of several (``app.cluster.Cluster``):
        #: ``cluster`` and ``instance_id`` stay None in SQLite's single-process mode.
        self.cluster = None
        self.instance_id: int | None = None
        #: Published when a running update job's ``command.update`` must go out on this process's
        #: socket for its host (routed here by another instance, or re-sent): ``(job_id, read=None)``;
        #: ``read(sql, params)`` (the cluster listener's connection) returns the first row of one statement.
        self.update_routed = Announcement("update_routed")


def install(app: Flask, rt: Runtime) -> Runtime:
    app.extensions[EXTENSION_KEY] = rt
    return rt


def runtime(app: Flask | None = None) -> Runtime:
    """The runtime of ``app`` (default: the current app)."""
    return (app if app is not None else current_app).extensions[EXTENSION_KEY]
