"""``restic-manager serve``: one process, two planes, one scheduler, one notifier thread.

waitress serves the admin plane; werkzeug's threaded server serves the agent plane, because
flask-sock needs the raw client socket that waitress never exposes (bounded for a public port:
:mod:`app.agents.server`). Both wrap the same app and
tag the WSGI environ with their plane, so each answers 404 for the other's routes.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import io
import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import NoReturn

import sqlalchemy as sa
import waitress
import waitress.utilities
from flask import Flask
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, WSGITask

from agent import protocol
from agent.daemon import StopFlag, install_signal_handlers

from .agents.server import AgentServer
from .config import agent_tls_context
from .errors import error_bytes
from .extensions import db
from .inputs import BODY_TOO_LARGE_KEY
from .runtime import runtime
from .timeutil import utcnow

log = logging.getLogger(__name__)


#: URL prefixes served by the agent plane; everything else is the admin plane's.
AGENT_PLANE_PREFIXES = ("/ws/", "/agent/")
# How often the agent plane's accept loop checks for a stop: it bounds how long stop() waits for it
# (socketserver's default 0.5 s); an idle wake-up is one select() call.
AGENT_PLANE_POLL_S = 0.05


class PlaneMiddleware:
    """Serve only this listener's (plane's) routes; answer 404 for the other plane's."""

    def __init__(self, app, plane: str):
        self.app = app
        self.plane = plane

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        is_agent_path = path.startswith(AGENT_PLANE_PREFIXES)
        if is_agent_path != (self.plane == "agent"):
            body = error_bytes("not_found", "not served on this listener")
            start_response("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        environ["rm.plane"] = self.plane
        return self.app(environ, start_response)


class _BodyTooLargeTask(WSGITask):
    """waitress refused a request body over the limit (by its Content-Length, or as a chunked body
    grew past it) without buffering it: the app words the 413 (JSON on /api, a page elsewhere)."""

    def get_environment(self):
        environ = super().get_environment()
        environ["wsgi.input"] = io.BytesIO()  # what waitress kept of the body is not the body
        environ["CONTENT_LENGTH"] = "0"
        environ[BODY_TOO_LARGE_KEY] = True
        return environ

    def build_response_header(self):
        self.set_close_on_finish()  # the rest of the body may still be on its way: don't read it
        return super().build_response_header()


def _error_task(channel, request):
    if isinstance(request.error, waitress.utilities.RequestEntityTooLarge):
        return _BodyTooLargeTask(channel, request)
    return ErrorTask(channel, request)


class _AdminChannel(HTTPChannel):
    error_task_class = staticmethod(_error_task)


class Servers:
    """The two listeners, the scheduler and the notifier thread of one ``serve`` run."""

    def __init__(
        self,
        app: Flask,
        scheduler: bool = True,
        notifier: bool | None = None,
        instance_name: str | None = None,
        worker: int | None = None,
    ):
        """``worker``: this process is worker ``worker`` of ``serve --workers N`` (its ports are shared
        through SO_REUSEPORT; only worker 0 serves the admin plane and the metrics listener)."""
        self.app = app
        self.worker = worker
        self.stopped = threading.Event()
        cfg = app.config
        # A worker listens only once it is ready (end of start()): while its siblings start, the
        # kernel must not queue a restart storm on the first one that happens to listen.
        self.agent = self._agent_server() if worker is None else None
        self.admin = None
        if worker is None or worker == 0:
            self.admin = self._admin_server(cfg)
        self.scheduler = None
        self.cluster = None  # app.cluster.Cluster on PostgreSQL, once started
        self._instance_name = instance_name
        self.metrics_server = None  # RM_METRICS_ADDR's listener, once started
        self._want_scheduler = scheduler
        self._want_notifier = scheduler if notifier is None else notifier
        self._threads: list[threading.Thread] = []

    def _agent_server(self) -> AgentServer:
        cfg = self.app.config
        ahost, aport = cfg["AGENT_ADDR"]
        return AgentServer(
            ahost,
            aport,
            PlaneMiddleware(self.app, "agent"),
            cfg["AGENT_BACKLOG"],
            handshake_timeout=cfg["AGENT_HANDSHAKE_TIMEOUT_S"],
            max_pending=cfg["AGENT_MAX_PENDING"],
            max_active=cfg["AGENT_MAX_ACTIVE"],
            close_timeout=cfg["AGENT_CLOSE_TIMEOUT_S"],
            tls=agent_tls_context(cfg),
            reuse_port=self.worker is not None,
            cpu_share=cpu_share(cfg.get("AGENT_PROCESSES", 1)),
        )

    def _admin_server(self, cfg):
        hhost, hport = cfg["HTTP_ADDR"]
        where: dict = {"host": hhost, "port": hport}
        if self.worker is not None:  # the parent holds the port reserved with SO_REUSEPORT: join it
            where = {"sockets": [reuseport_socket(hhost, hport, listen=True)]}
        admin = waitress.create_server(
            PlaneMiddleware(self.app, "admin"),
            **where,
            threads=8,
            ident="restic-manager",
            clear_untrusted_proxy_headers=True,
            # poll(), not select(): with thousands of agent sockets open, admin sockets get
            # descriptors >= 1024 and select() kills the admin-plane thread (docs/capacity.md).
            asyncore_use_poll=True,
            # waitress buffers a whole body before the app runs: never more than the app accepts.
            max_request_body_size=cfg["MAX_CONTENT_LENGTH"] + 1,  # waitress refuses at >= this
        )
        admin.channel_class = _AdminChannel
        return admin

    @property
    def admin_port(self) -> int | None:
        return self.admin.effective_port if self.admin is not None else None

    @property
    def agent_port(self) -> int:
        return self.agent.server_port

    @property
    def agent_tls(self) -> bool:
        return self.agent.ssl_context is not None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.server_port if self.metrics_server is not None else None

    def start(self) -> None:
        from . import cluster

        if cluster.enabled(self.app):  # PostgreSQL: this process is one instance of possibly several
            self.cluster = cluster.Cluster(self.app, self._instance_name)
            self.cluster.install()
            self.cluster.start()
        with self.app.app_context():
            prepare(self.app)
        runtime(self.app).presence.start(self.app)
        if self._want_scheduler:
            from . import scheduler

            self.scheduler = scheduler.start(self.app)
        if self._want_notifier:
            runtime(self.app).notifier.start()
        if self.app.config.get("METRICS_ADDR") and self.admin is not None:
            from .metrics import start_listener

            self.metrics_server = start_listener(self.app, *self.app.config["METRICS_ADDR"])
        if self.agent is None:
            self.agent = self._agent_server()
        agent_loop = functools.partial(self.agent.serve_forever, poll_interval=AGENT_PLANE_POLL_S)
        planes = [("agent-plane", agent_loop)] + ([("admin-plane", self.admin.run)] if self.admin else [])
        for name, target in planes:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, exiting: bool = False) -> None:
        """Stop accepting, close every agent socket, stop the scheduler; bounded in time.

        ``exiting``: the process exits right after (``serve``): the sockets' threads are not woken
        to finish their close handshakes (``ConnectionRegistry.close_all``)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        t0 = time.monotonic()
        marks: list[tuple[str, float]] = []

        def mark(phase: str) -> None:
            marks.append((phase, time.monotonic()))

        # Stop accepting first: agents reconnect within a second of the close below, and must be
        # refused at once, not accepted by a dying server and reset later (docs/capacity.md).
        if self.agent is not None:
            self.agent.shutdown()
            self.agent.server_close()
        mark("listener")
        rt = runtime(self.app)
        held = rt.connections.host_ids()
        spread = None if self.agent is None else self.agent.restart_spread(len(held))
        going_away = protocol.going_away_reason(spread)
        # One statement marks every host this process holds offline, instead of one commit per
        # closing socket (2,000 of them queueing for SQLite's write lock at every restart).
        rt.presence.stop(offline=held)
        mark("offline")
        if self.admin is not None:
            self._close_admin_plane()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self._want_notifier:
            runtime(self.app).notifier.stop()
        for t in self._threads:
            t.join(timeout=2)
            if t.is_alive():  # it was not woken: the stop waited its 2 s out (tests look for this)
                log.warning("the %s thread did not end within 2 s of the stop; left running", t.name)
        if self.cluster is not None:
            self.cluster.stop()
        if self.admin is not None:
            self._close_admin_channels()  # a no-op when the loop closed them; else (never started) now
        mark("the rest")
        with self.app.app_context():
            try:
                db.engine.dispose()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        mark("database")
        if exiting:
            # Said and flushed before the closes: after them this thread must not let go of the GIL
            # again (close_all keeps it; ``serve`` exits right after), or it queues for it behind
            # every socket thread an agent's hang-up wakes (two stops of four once overran their
            # 9 s watchdog there, after all else was done in 2 s).
            self._log_stopped(t0, marks, len(held), f"closing the agent sockets ({going_away}) and exiting")
            flush_log_streams()
        # Last: each close wakes the socket's two threads (the agent answers at once), thousands of
        # them runnable together, and the GIL goes round them all before this thread has it again.
        # 1001: the agents retry a refused connect quickly while we restart, spread over the window
        # the reason names, if any (agent.transport.Backoff)
        rt.connections.close_all(protocol.CLOSE_GOING_AWAY, going_away, exiting=exiting)
        if not exiting:
            mark("sockets")
            self._log_stopped(t0, marks, len(held), going_away if spread is not None else "")

    @staticmethod
    def _log_stopped(t0: float, marks: list[tuple[str, float]], sockets: int, then: str = "") -> None:
        steps, last = [], t0
        for phase, at in marks:
            steps.append(f"{phase} {at - last:.2f}")
            last = at
        tail = f"; {then}" if then else ""
        log.info("stopped in %.2f s (%s s; %d agent sockets)%s", last - t0, ", ".join(steps), sockets, tail)

    def _close_admin_plane(self) -> None:
        """Close the admin plane inside its own loop thread, woken by waitress's trigger, so the
        loop ends now instead of at its next idle timeout (1 s), and idle keep-alive connections
        don't keep it running."""
        try:
            self.admin.trigger.pull_trigger(self._close_admin_channels)
        except OSError:  # the trigger is already closed: nothing left to wake
            pass

    def _close_admin_channels(self) -> None:
        for channel in list(self.admin._map.values()):  # the listener, its trigger, open connections
            # a connection's handle_close also releases a request thread waiting to write to it
            (channel.handle_close if isinstance(channel, HTTPChannel) else channel.close)()


def prepare(app: Flask) -> None:
    """Make the database and release store ready before the listeners open."""
    from .models import Host
    from .updates import releases

    # No socket is connected to a process that has not started listening yet. With several
    # instances, the hosts a live peer holds stay its own; a dead one's are the leader's to sweep.
    offline = sa.update(Host).where(Host.connected.is_(True))
    if runtime(app).cluster is not None:
        offline = offline.where(Host.instance_id.is_(None))
    db.session.execute(offline.values(connected=False))
    db.session.commit()
    rt = runtime(app)
    rt.inflight.reload()
    rt.started_at = utcnow()
    if app.config.get("BUILD_AGENT_ON_START", True):
        rel = releases.ensure_current_release()
        log.info("agent release %s (%s, %d bytes, sha256 %s)", rel.version, rel.platform, rel.size, rel.sha256)
    db.session.remove()


def cpu_share(processes: int) -> float:
    """The cores one of ``processes`` agent-plane processes on this machine may count on: one at
    most (the GIL's), fewer when the processes outnumber the cores this one may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return min(1.0, cores / max(1, processes))


def tune_threads(stack_kib: int, switch_interval: float | None = None) -> None:
    """Tune the process for thousands of agent sockets, each holding threads and a descriptor.

    Smaller thread stacks; optionally a different GIL switch interval; and the soft open-files
    limit raised to the hard one (each agent costs a descriptor; a soft 1024 caps the fleet).
    See docs/capacity.md for the measurements behind the defaults.
    """
    if stack_kib:
        threading.stack_size(stack_kib * 1024)
    if switch_interval:
        sys.setswitchinterval(switch_interval)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit we have
        pass


def wait_for_stop_signal(poll_s: float = 0.1, every=None, stop: StopFlag | None = None) -> int | None:
    """Block the main thread until SIGINT or SIGTERM arrives; return the signal's number.

    The handlers only set a flag (``agent.daemon.StopFlag``: ``threading.Event.set`` takes a lock
    the interrupted thread may hold); this loop polls it in short slices (calling ``every()`` at
    each one, if given) and the caller does the shutdown work. Call it from the main thread: only
    that thread may install signal handlers. ``stop``: a flag whose handlers were installed earlier
    (a signal during start-up then ends the wait at once).
    """
    if stop is None:
        stop = StopFlag()
        install_signal_handlers(stop)
    while not stop.is_set():
        time.sleep(poll_s)
        if every is not None and not stop.is_set():
            every()
    return stop.signum


def reuseport_socket(host: str, port: int, listen: bool = False) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, listening if asked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    return sock


SQLITE_SECOND_PROCESS = (
    "another restic-manager serve already runs on the SQLite database {path}: SQLite serves one process. "
    "Stop that one first, or use PostgreSQL (RM_DATABASE_URL) to run several instances (docs/deploy.md)"
)


def sqlite_single_process(app: Flask):
    """SQLite: hold an exclusive lock beside the database file, so a second ``serve`` is refused at start.

    Returns the open lock file (keep it for the process's life; the kernel drops the lock when the
    process dies), or None for PostgreSQL or an in-memory database. Raises :class:`SystemExit` with
    the reason when another process holds it.
    """
    url = sa.engine.make_url(app.config["SQLALCHEMY_DATABASE_URI"])
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    import fcntl

    lock = open(url.database + ".serve-lock", "a")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit("error: " + SQLITE_SECOND_PROCESS.format(path=url.database)) from None
    return lock


#: How long ``serve`` gives its stop before it exits anyway (below ``serve --workers``'s 15 s; a
#: stop takes 0.5-2 s with 2,500 agents a process, its essential writes done in the first).
STOP_WATCHDOG_S = 7.0


def serve(app: Flask, ready_file: str | None = None, worker: int | None = None) -> NoReturn:
    lock = sqlite_single_process(app)  # noqa: F841 - held until the process exits
    # From the start: a SIGTERM while starting (a worker restarted just before a stop) still ends
    # in a clean stop that deregisters the instance.
    stop = StopFlag()
    install_signal_handlers(stop)
    tune_threads(app.config["THREAD_STACK_KIB"], app.config.get("SWITCH_INTERVAL"))
    name = None if worker is None else f"{socket.gethostname()}:{os.getpid()}:worker{worker}"
    servers = Servers(app, instance_name=name, worker=worker)
    servers.start()
    # Start-up objects (app, models, templates) never die: keep them out of every GC pass, so a
    # full collection under thousands of sockets stays short (seen as 45-100 ms rollout gaps).
    gc.freeze()
    admin_host, _ = app.config["HTTP_ADDR"]
    agent_host, _ = app.config["AGENT_ADDR"]
    ws = "wss" if servers.agent_tls else "ws"
    admin = f"admin http://{admin_host}:{servers.admin_port}/ " if servers.admin is not None else ""
    who = "" if worker is None else f" worker {worker} (instance {servers.cluster.id if servers.cluster else '-'})"
    print(
        f"restic-manager {app.config['SERVER_VERSION']}{who}: {admin}agents {ws}://{agent_host}:{servers.agent_port}/ws/agent",
        flush=True,
    )
    if servers.metrics_port is not None:
        print(f"metrics: http://{app.config['METRICS_ADDR'][0]}:{servers.metrics_port}/metrics", flush=True)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{servers.admin_port or 0} {servers.agent_port}\n")

    signum = wait_for_stop_signal(stop=stop)
    log.info("shutting down (signal %s)", signum)
    watchdog = threading.Timer(STOP_WATCHDOG_S, _stop_overdue, args=(threading.get_ident(),))
    watchdog.daemon = True
    watchdog.start()
    # The timer needs the GIL, which thousands of closing sockets' threads may keep from it: this
    # one runs in C without it, dumps the newest threads' stacks to stderr and exits (code 1).
    faulthandler.dump_traceback_later(STOP_WATCHDOG_S + 2, exit=True)
    servers.stop(exiting=True)
    # All is stopped and written, the log flushed (in stop(), before the closes, without logging's
    # locks: logging.shutdown() queued for them behind the socket threads for up to 2.8 s of a
    # restart); left are thousands of daemon threads the closes woke. Letting the interpreter
    # tear them down took 4+ s of a restart under load (docs/capacity.md), and nothing they
    # still do matters: leave now, without a call that would let go of the GIL first.
    os._exit(0)


def _stop_overdue(main_ident: int) -> None:
    """The stop has run past ``STOP_WATCHDOG_S``: say where it is, and exit without the rest.

    A stop writes the hosts offline and sends every agent its close frame first, in its first
    second or two; whatever is still running this late is cleanup the exit does anyway. A
    supervisor would kill the process soon (systemd's ``TimeoutStopSec``, ``serve --workers``'s
    15 s), with nothing on record about why.
    """
    frame = sys._current_frames().get(main_ident)
    where = "".join(traceback.format_stack(frame)) if frame is not None else "(the main thread is gone)\n"
    log.warning("the stop did not finish within %g s; exiting now. It was at:\n%s", STOP_WATCHDOG_S, where.rstrip())
    flush_log_streams()
    os._exit(0)


def flush_log_streams() -> None:
    """Flush every logging handler's stream and stdout/stderr, without taking logging's locks."""
    streams = [getattr(h, "stream", None) for h in logging.getLogger().handlers]
    for stream in [*streams, sys.stdout, sys.stderr]:
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing to flush
            pass
