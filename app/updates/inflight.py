"""The in-flight update registry: host id -> the update job the server is waiting on.

A cache of the ``jobs`` table (running update jobs), so that the hot path — every agent
``hello`` in a reconnect storm — needs no query when nothing is in flight. It is loaded from
the database on first use, so a restarted server picks up where the old one was.
"""

from __future__ import annotations

import datetime as dt
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


class InFlightRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_host: dict[int, InFlight] = {}
        self._loaded = False

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        from ..extensions import db
        from ..models import Job

        rows = db.session.scalars(sa.select(Job).where(Job.kind == "update", Job.status == "running")).all()
        entries = {
            j.host_id: InFlight(j.id, j.host_id, j.target_version or "", j.deadline, j.phase == "restarting")
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
        self._ensure_loaded()
        with self._lock:
            return self._by_host.get(host_id)

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
        with self._lock:
            return len(self._by_host)
