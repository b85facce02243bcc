"""The probation watchdog: a newly swapped-in program commits on its first welcome or is rolled back.

At start-up (:meth:`Probation.start_up`) the agent refreshes the sh guard beside its program and
runs :func:`agent.recovery.repair`. When repair says the running program is on probation, a watch
thread waits until :meth:`Probation.commit` is called (on the server's first welcome) or the
deadline taken from the marker's ``started_at`` passes; past the deadline the previous program is
restored (:func:`agent.recovery.roll_back`) and ``on_rollback`` is called so the agent exits for
the restart. A stop request ends the watch without a verdict: the next start continues the
probation. The file work (marker, state, rename) is :mod:`agent.recovery`'s; this module only
decides *when*.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

from agent import recovery
from agent.failpoints import failpoint

log = logging.getLogger("agent.probation")


@dataclass(eq=False)
class Probation:
    """The probation of the running program, from start-up repair to commit or rollback."""

    program: str | None  # None when run from source: then start_up is never called
    state_dir: str
    version: str
    probation_s: float
    _: KW_ONLY
    stopped: Callable[[], bool]
    on_rollback: Callable[[], None]
    tick: float
    clock: Callable[[], float] = time.monotonic
    thread: threading.Thread | None = field(default=None, init=False)
    # the marker while this program waits for its first welcome; None once committed or rolled back
    _marker: dict | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _over: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def active(self) -> bool:
        """True while the program is on probation (neither committed nor rolled back)."""
        with self._lock:
            return self._marker is not None

    def start_up(self) -> bool:
        """Repair any half-finished update; start the watch if this program is on probation.

        :return: True when repair rolled back to the previous program, which is now in place:
            the process must exit so the service manager starts it.
        """
        try:
            recovery.install_guard(os.path.dirname(self.program))
        except OSError as exc:
            log.debug("cannot refresh the start-up guard: %s", exc)
        try:
            result = recovery.repair(self.program, self.state_dir, self.version)
        except OSError as exc:
            log.error("start-up repair failed: %s", exc)
            return False
        if result.action == "restart":
            log.warning("rolled back to the previous program; exiting so it gets started")
            return True
        if result.action == "probation":
            self.watch(result.marker)
        return False

    def watch(self, marker: dict) -> None:
        """Put the running program on probation under ``marker`` and start the watch thread."""
        remaining = recovery.probation_remaining(marker, self.probation_s)
        log.info(
            "version %s is on probation (job %s): committing once the server welcomes it, "
            "rolling back to %s if that does not happen within %.1f s",
            self.version,
            marker.get("job_id"),
            marker.get("from_version"),
            max(0.0, remaining),
        )
        with self._lock:
            self._marker = marker
        deadline = self.clock() + remaining
        self.thread = threading.Thread(target=self._watch, args=(deadline,), name="probation", daemon=True)
        self.thread.start()

    def commit(self) -> None:
        """The server welcomed this program: record ``committed`` and end the probation (no-op when not on it)."""
        with self._lock:
            marker = self._marker
            if marker is None:
                return
            failpoint("before_welcome_commit", self.state_dir)
            try:
                recovery.commit(self.state_dir, marker)
            except OSError as exc:
                log.error("cannot commit version %s: %s", self.version, exc)
                return
            self._marker = None
            self._over.set()

    def _watch(self, deadline: float) -> None:
        while not self._over.wait(min(self.tick, max(0.0, deadline - self.clock()))):
            if self.stopped():
                return  # a stop is not a verdict: the next start continues the probation
            if self.clock() >= deadline:
                break
        with self._lock:
            marker, self._marker = self._marker, None
            if marker is None:
                return  # committed meanwhile
            reason = f"new version {self.version} never reached the server within {self.probation_s:g} s"
            try:
                rolled_back = recovery.roll_back(self.program, self.state_dir, marker, reason)
            except OSError as exc:
                log.error("rollback failed: %s", exc)
                return
        if rolled_back:
            self.on_rollback()
