"""``restic-manager serve --workers N``: N server processes sharing one agent port (PostgreSQL only).

This parent process serves nothing itself. It reserves the agent and admin ports with
``SO_REUSEPORT`` sockets it never listens on (so port 0 resolves once, and a restarted worker
gets the same ports), builds the agent release once, then **forks** N workers from itself: the
app is imported and configured once, and a worker (re)starts in a fraction of a second instead of
paying the imports again (what matters in a restart storm). The parent starts no thread and
closes its database connections before forking, so a child inherits no lock and no socket.

Each worker is a full instance (``app.cluster``): its own agent plane on the shared port (the
kernel spreads new connections among the listening workers), its own scheduler (whose jobs only
the leader runs) and heartbeat. Worker 0 also serves the admin plane and the metrics listener:
admin traffic is small, one admin plane keeps one ``/metrics``, and a command given there reaches
a host on any worker through the database (docs/deploy.md#one-machine-several-workers). A worker
that dies is forked again; SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import traceback

from flask import Flask

from agent.daemon import StopFlag, install_signal_handlers

from .extensions import db
from .serve import reuseport_socket, serve, wait_for_stop_signal

log = logging.getLogger(__name__)

#: How long the workers get to stop after SIGTERM before they are killed.
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 120.0


def refuse_sqlite(app: Flask, workers: int) -> None:
    if not str(app.config["SQLALCHEMY_DATABASE_URI"]).startswith("postgresql"):
        raise SystemExit(
            f"error: --workers {workers} needs PostgreSQL (RM_DATABASE_URL=postgresql+psycopg://...): "
            "SQLite serves one process. Run `restic-manager serve` without --workers, or move to "
            "PostgreSQL (docs/deploy.md)"
        )


class Worker:
    def __init__(self, app: Flask, index: int, ready_dir: str):
        self.app = app
        self.index = index
        self.ready_file = os.path.join(ready_dir, f"worker-{index}.ready")
        self.pid: int | None = None
        self.returncode: int | None = None
        self.restarts = 0

    def start(self) -> None:
        try:
            os.unlink(self.ready_file)
        except FileNotFoundError:
            pass
        self.returncode = None
        with self.app.app_context():
            db.engine.dispose()  # no pooled connection may be shared with a child
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _die_with_parent()
                code = serve(self.app, ready_file=self.ready_file, worker=self.index)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def poll(self) -> int | None:
        """The worker's exit status once it has exited (a signal as its negative), else None."""
        if self.pid is None or self.returncode is not None:
            return self.returncode
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.pid is not None and self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def ready(self) -> tuple[int, int] | None:
        try:
            with open(self.ready_file) as f:
                admin, agent = f.read().split()
            return int(admin), int(agent)
        except (FileNotFoundError, ValueError):
            return None


def _die_with_parent() -> None:
    """In the worker: SIGTERM it if the parent dies (Linux), so no worker is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_workers(app: Flask, workers: int, ready_file: str | None = None) -> int:
    refuse_sqlite(app, workers)
    stop = StopFlag()  # from the start: a stop during start-up stops the workers started so far
    install_signal_handlers(stop)
    ahost, aport = app.config["AGENT_ADDR"]
    hhost, hport = app.config["HTTP_ADDR"]
    agent_hold = reuseport_socket(ahost, aport)
    admin_hold = reuseport_socket(hhost, hport)
    aport, hport = agent_hold.getsockname()[1], admin_hold.getsockname()[1]
    if app.config.get("BUILD_AGENT_ON_START", True):
        from .updates import releases

        with app.app_context():
            rel = releases.ensure_current_release()
            log.info("agent release %s (%s, sha256 %s)", rel.version, rel.platform, rel.sha256)
    # What every worker inherits: the resolved ports, the release already built, and how many
    # share the machine's cores (the pace a worker expects of itself: app/agents/server.py).
    app.config.update(
        AGENT_ADDR=(ahost, aport), HTTP_ADDR=(hhost, hport), BUILD_AGENT_ON_START=False, AGENT_PROCESSES=workers
    )
    ready_dir = tempfile.mkdtemp(prefix="rm-workers-")
    pool = [Worker(app, i, ready_dir) for i in range(workers)]
    for w in pool:
        w.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(w.ready() for w in pool):
        if stop.is_set():
            _stop(pool)
            return 0
        dead = [w for w in pool if w.poll() is not None]
        if dead or time.monotonic() > deadline:
            _stop(pool)
            why = f"worker {dead[0].index} exited with {dead[0].returncode}" if dead else "timed out"
            raise SystemExit(f"error: the workers did not start: {why}")
        time.sleep(0.05)
    print(
        f"restic-manager {app.config['SERVER_VERSION']}: {workers} workers; admin http://{hhost}:{hport}/ "
        f"agents on port {aport} (SO_REUSEPORT)",
        flush=True,
    )
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{hport} {aport}\n")

    def keep_alive() -> None:
        for w in pool:
            if w.poll() is not None:
                w.restarts += 1
                log.warning("worker %d exited with %s; starting it again", w.index, w.returncode)
                w.start()

    signum = wait_for_stop_signal(every=keep_alive, stop=stop)
    log.info("stopping %d workers (signal %s)", workers, signum)
    _stop(pool)
    agent_hold.close()
    admin_hold.close()
    return 0


def _stop(pool: list[Worker]) -> None:
    for w in pool:
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(w.poll() is None for w in pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in pool:
        if w.poll() is None:
            log.warning("worker %d did not stop in time; killing it", w.index)
            w.signal(signal.SIGKILL)
            os.waitpid(w.pid, 0)
