"""The in-flight update registry: host id -> the update job the server is waiting on.

A cache of the ``jobs`` table (running update jobs), so that the hot path — every agent
``hello`` in a reconnect storm — needs no query when nothing is in flight. It is loaded from
the database on first use, so a restarted server picks up where the old one was.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
from dataclasses import dataclass

import sqlalchemy as sa


@dataclass
class InFlight:
    job_id: str
    host_id: int
    target_version: str
    deadline: dt.datetime | None
    restarting: bool = False
    phase: str | None = None  # the job's phase when read from the database (uncached registry)
    host_name: str | None = None  # the host's name at dispatch (the job's ``host_name``)


class InFlightRegistry:
    """``cached=False`` (several instances on PostgreSQL): every read asks the database, because a
    job dispatched by another instance ends with a hello here; the partial unique index on running
    update jobs makes that read one index lookup."""

    def __init__(self, cached: bool = True):
        self._lock = threading.Lock()
        self._by_host: dict[int, InFlight] = {}
        self._loaded = False
        self.cached = cached

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        from ..extensions import db
        from ..models import Job

        rows = db.session.scalars(sa.select(Job).where(Job.kind == "update", Job.status == "running")).all()
        entries = {
            j.host_id: InFlight(
                j.id, j.host_id, j.target_version or "", j.deadline, j.phase == "restarting", host_name=j.host_name
            )
            for j in rows
        }
        with self._lock:
            if not self._loaded:
                self._by_host.update(entries)
                self._loaded = True

    def reload(self) -> None:
        with self._lock:
            self._by_host.clear()
            self._loaded = False
        self._ensure_loaded()

    def add(self, entry: InFlight) -> None:
        self._ensure_loaded()
        with self._lock:
            self._by_host[entry.host_id] = entry

    def get(self, host_id: int) -> InFlight | None:
        if not self.cached:
            return self.get_many((host_id,)).get(host_id)
        self._ensure_loaded()
        with self._lock:
            return self._by_host.get(host_id)

    def get_many(self, host_ids) -> dict[int, InFlight]:
        """The entries of these hosts that have one (uncached: one query for all of them)."""
        if not self.cached:
            from ..extensions import db

            ids = list(host_ids)
            if not ids:
                return {}
            # plain rows, not ORM objects, from a statement built once: every batch of hellos asks,
            # and almost never finds one
            rows = db.session.execute(_running_jobs_of(), {"ids": ids}).all()
            return {j.host_id: _entry(j) for j in rows}
        self._ensure_loaded()
        with self._lock:
            return {h: self._by_host[h] for h in host_ids if h in self._by_host}

    def mark_restarting(self, host_id: int, job_id: str) -> None:
        self._ensure_loaded()
        with self._lock:
            e = self._by_host.get(host_id)
            if e is not None and e.job_id == job_id:
                e.restarting = True

    def discard(self, host_id: int, job_id: str) -> None:
        with self._lock:
            e = self._by_host.get(host_id)
            if e is not None and e.job_id == job_id:
                del self._by_host[host_id]

    def __len__(self) -> int:
        if not self.cached:
            from ..extensions import db
            from ..models import Job

            return db.session.scalar(
                sa.select(sa.func.count(Job.id)).where(Job.kind == "update", Job.status == "running")
            )
        with self._lock:
            return len(self._by_host)


@functools.cache
def _running_jobs_of() -> sa.Select:
    from ..models import Job

    return sa.select(Job.id, Job.host_id, Job.params, Job.deadline, Job.phase, Job.host_name).where(
        Job.host_id.in_(sa.bindparam("ids", expanding=True)), Job.kind == "update", Job.status == "running"
    )


def _entry(j) -> InFlight:
    """A running job's entry as read from the database (the uncached registry): a row of :func:`_running_jobs_of`."""
    version = (j.params or {}).get("version")
    return InFlight(j.id, j.host_id, version or "", j.deadline, j.phase == "restarting", j.phase, j.host_name)
