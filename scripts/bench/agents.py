#!/usr/bin/env python3
"""How many agents one server holds: N real agent connections against a real ``restic-manager serve``.

    .venv/bin/python scripts/bench/agents.py --agents 2000 [--duration 20] [--json]

What it does (all on 127.0.0.1, every wait bounded, server and load process always stopped):

1. a fresh instance folder and SQLite database (``restic-manager db upgrade``), N hosts enrolled in
   one transaction plus an admin user and API token, written directly through the app's models;
2. ``restic-manager serve --no-build`` as a separate process; its RSS and thread count with 0 agents;
3. a separate load process (this file, ``--load-worker``): one epoll loop over N non-blocking
   sockets speaking the agent protocol with wsproto: WebSocket handshake with
   ``Authorization: Bearer <token>`` (no permessage-deflate, like the real agent), ``hello``, wait
   for ``welcome``, ``heartbeat`` every heartbeat_s, ``pong`` to every ``ping``, and on any drop the
   real agent's reconnect rule (agent.transport.Backoff: full jitter, base 0.5 s, capped);
4. time for all N to be welcomed; server RSS / threads / CPU while N sit idle for --duration s;
5. round trip of a message to one agent while N are idle: ``POST /api/hosts/<id>/ping`` --pings
   times (server-reported rtt_ms and the HTTP round trip), p50/p99;
6. the reconnect storm: SIGTERM the server, start it again on the same ports, time until all N
   are welcomed again (load process) and marked connected (the server's database).

Targets (issue 2): N = 2000 with RSS <= 300 MB and all back online <= 15 s after a restart.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import platform
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import (  # noqa: E402
    ROOT,
    Server,
    cli,
    group_cpu_seconds,
    group_status,
    kill_group,
    percentile,
    print_table,
    prompt_fleet,
    raise_nofile,
    server_env,
    sysctl,
    tcp_ext,
)

sys.path.insert(0, ROOT)
from agent.config import DEFAULT_BACKOFF_MAX_S  # noqa: E402  (the real agent's default cap)

VERSION = "1.0.0"
TARGET_RSS_MB = 300
TARGET_STORM_S = 15.0
#: Issue 13: 10,000 agents on 4 workers (PostgreSQL) all back this soon after a restart of all workers.
TARGET_STORM_WORKERS_S = 30.0


# =====================================================================================  load process


class _Agent:
    __slots__ = ("idx", "token", "sock", "ws", "state", "gen", "out", "backoff", "started", "msg", "hb_s")

    def __init__(self, idx, token, backoff):
        self.idx = idx
        self.token = token
        self.sock = None
        self.ws = None
        self.state = "idle"  # idle -> connecting -> handshake -> hello -> online
        self.gen = 0
        self.out = b""
        self.backoff = backoff
        self.started = 0.0
        self.msg = []
        self.hb_s = 15.0


class LoadGen:
    """N agents multiplexed on one epoll loop; answers status/mark/stop commands on stdin/stdout.

    Other benchmarks subclass it (scripts/bench/fleet_rollout.py): ``agent_class``, ``_hello``
    and the ``_on_welcome`` / ``_on_envelope`` / ``_on_custom_timer`` / ``_handle_command`` hooks.
    """

    agent_class = _Agent
    sched = "normal"  #: the load process's scheduling policy (_common.prompt_fleet)
    #: timer kinds handled here; any other kind goes to ``_on_custom_timer``
    BUILTIN_TIMERS = frozenset(("connect", "heartbeat", "connect_deadline", "welcome_deadline"))

    def __init__(self, port: int, tokens: list[str], backoff_cap: float, max_runtime: float):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (
            AcceptConnection,
            CloseConnection,
            Ping,
            RejectConnection,
            Request,
            TextMessage,
        )

        from agent import protocol
        from agent.client import STABLE_CONNECTION_S, WELCOME_TIMEOUT_S
        from agent.transport import BACKOFF_BASE_S, CONNECT_TIMEOUT_S, Backoff

        self.p = protocol
        self.WSConnection, self.CLIENT = WSConnection, ConnectionType.CLIENT
        self.Accept, self.Reject, self.Close, self.Ping, self.Request, self.Text = (
            AcceptConnection, RejectConnection, CloseConnection, Ping, Request, TextMessage,
        )
        self.connect_timeout, self.welcome_timeout = CONNECT_TIMEOUT_S, WELCOME_TIMEOUT_S
        self.stable_s = STABLE_CONNECTION_S
        self.addr = ("127.0.0.1", port)
        self.host_header = f"127.0.0.1:{port}"
        self.agents = [self.agent_class(i, t, Backoff(BACKOFF_BASE_S, backoff_cap)) for i, t in enumerate(tokens)]
        self.n = len(tokens)
        self.sel = selectors.EpollSelector()
        self.timers: list = []
        self.seq = 0
        self.deadline = time.monotonic() + max_runtime
        self.boot = [os.urandom(8).hex() for _ in tokens]
        self.pyver = platform.python_version()
        self.arch = platform.machine()
        # figures
        self.online = 0
        self.c = dict(attempts=0, welcomes=0, refused=0, timeouts=0, rejected=0, resets=0, closed_by_server=0,
                      pings=0, heartbeats=0, errors=0)
        self.t_first_attempt = None
        self.t_all_online = None
        self.mark_t = None
        self.mark_min_online = None
        self.mark_welcomes: list[float] = []
        # after the mark, per welcome: when its successful attempt started (the agents' own schedule:
        # backoff) and how long that attempt took to be welcomed (the server's side)
        self.mark_attempt_starts: list[float] = []
        self.mark_handshakes: list[float] = []
        self.t_all_after_mark = None
        self.stopping = False

    # ---------------------------------------------------------------- plumbing

    def _timer(self, when, a, kind):
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, a.idx, a.gen, kind))

    def _send(self, a, data: bytes) -> bool:
        """Queue/send bytes; on a dead socket drop the link (callers check ``a.ws`` afterwards)."""
        if a.sock is None:
            return False
        if a.out:
            a.out += data
            return True
        try:
            n = a.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(a, "resets")
            return False
        if n < len(data):
            a.out = data[n:]
            self.sel.modify(a.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, a)
        return True

    def _send_env(self, a, type_, data=None):
        return a.ws is not None and self._send(a, a.ws.send(self.Text(data=self.p.encode(type_, data))))

    def _drop(
        self, a, why: str, reconnect_in: float | None = None, going_away: bool = False, spread: float | None = None
    ) -> None:
        """The link is gone: release the socket and schedule the reconnect exactly like agent.client
        (a refused connect after the server's 1001 close is retried quickly, spread over the window
        the close's reason names if it names one: agent.transport.Backoff).

        ``reconnect_in`` overrides the backoff (a simulated restart reconnects after its restart delay).
        """
        now = time.monotonic()
        if a.sock is not None:
            try:
                self.sel.unregister(a.sock)
            except (KeyError, ValueError):
                pass
            a.sock.close()
        welcomed = a.state == "online"
        if welcomed:
            self.online -= 1
            if self.mark_t is not None:
                self.mark_min_online = min(self.mark_min_online, self.online)
        self.c[why] = self.c.get(why, 0) + 1
        a.sock, a.ws, a.out, a.msg, a.state = None, None, b"", [], "idle"
        a.gen += 1
        if self.stopping:
            return
        if welcomed or now - a.started >= self.stable_s:
            a.backoff.reset()
        if going_away:
            a.backoff.server_going_away(spread)
        if reconnect_in is None:
            reconnect_in = a.backoff.next_delay(refused=why == "refused")
        self._timer(now + reconnect_in, a, "connect")

    def _connect(self, a) -> None:
        now = time.monotonic()
        if self.t_first_attempt is None:
            self.t_first_attempt = now
        self.c["attempts"] += 1
        a.started = now
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a.sock, a.state, a.out, a.msg = s, "connecting", b"", []
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._drop(a, "refused" if err == errno.ECONNREFUSED else "resets")
            return
        self.sel.register(s, selectors.EVENT_WRITE, a)
        self._timer(now + self.connect_timeout, a, "connect_deadline")

    def _on_writable(self, a) -> None:
        if a.state == "connecting":
            err = a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:  # only a refusal (nothing listens) is "refused", as ConnectionRefusedError in agent.client
                self._drop(a, "refused" if err == errno.ECONNREFUSED else "resets")
                return
            a.state = "handshake"
            a.ws = self.WSConnection(self.CLIENT)
            self.sel.modify(a.sock, selectors.EVENT_READ, a)
            req = self.Request(host=self.host_header, target="/ws/agent",
                               extra_headers=[("Authorization", f"Bearer {a.token}")])
            self._send(a, a.ws.send(req))
            return
        try:
            n = a.sock.send(a.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(a, "resets")
            return
        a.out = a.out[n:]
        if not a.out:
            self.sel.modify(a.sock, selectors.EVENT_READ, a)

    def _on_readable(self, a) -> None:
        try:
            data = a.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(a, "resets")
            return
        if not data:
            self._drop(a, "resets")
            return
        try:
            a.ws.receive_data(data)
            for ev in a.ws.events():
                if isinstance(ev, self.Text):
                    a.msg.append(ev.data)
                    if ev.message_finished:
                        frame, a.msg = "".join(a.msg), []
                        self._on_frame(a, frame)
                elif isinstance(ev, self.Accept):
                    a.state = "hello"
                    if not self._send_env(a, "hello", self._hello(a.idx)):
                        return
                    self._timer(time.monotonic() + self.welcome_timeout, a, "welcome_deadline")
                elif isinstance(ev, self.Ping):
                    self._send(a, a.ws.send(ev.response()))
                elif isinstance(ev, self.Close):
                    try:
                        self._send(a, a.ws.send(ev.response()))
                    except Exception:  # noqa: BLE001 - the peer is gone anyway
                        pass
                    going_away = ev.code == self.p.CLOSE_GOING_AWAY
                    spread = self.p.reconnect_spread(ev.reason) if going_away else None
                    self._drop(a, "closed_by_server", going_away=going_away, spread=spread)
                    return
                elif isinstance(ev, self.Reject):
                    self._drop(a, "rejected")
                    return
                if a.ws is None:
                    return
        except OSError:
            self._drop(a, "resets")
        except Exception:  # noqa: BLE001 - wsproto protocol errors and the like
            self._drop(a, "errors")

    def _hello(self, i: int) -> dict:
        return {"agent_version": VERSION, "os": "linux", "arch": self.arch, "hostname": f"bench-{i}",
                "python": self.pyver, "capabilities": [], "boot_id": self.boot[i], "last_update": None,
                "platform": "py3-any"}

    def _on_frame(self, a, frame: str) -> None:
        try:
            env = self.p.decode(frame)
        except self.p.ProtocolError:
            self.c["errors"] += 1
            return
        if env.type == "ping":
            self.c["pings"] += 1
            self._send_env(a, "pong", {"ref": env.id})
        elif env.type == "welcome" and a.state == "hello":
            now = time.monotonic()
            a.state = "online"
            a.backoff.reset()
            a.hb_s = max(0.05, float(env.data["heartbeat_s"]))
            self._timer(now + a.hb_s, a, "heartbeat")
            self.online += 1
            self.c["welcomes"] += 1
            if self.online == self.n and self.t_all_online is None:
                self.t_all_online = now
            if self.mark_t is not None:
                self.mark_welcomes.append(now - self.mark_t)
                self.mark_attempt_starts.append(a.started - self.mark_t)
                self.mark_handshakes.append(now - a.started)
                if self.online == self.n and self.t_all_after_mark is None and self.mark_min_online < self.n:
                    self.t_all_after_mark = now
            self._on_welcome(a, env, now)
        else:
            self._on_envelope(a, env)

    # ---------------------------------------------------------------- hooks for subclasses

    def _on_welcome(self, a, env, now: float) -> None:
        """A welcome arrived on ``a``'s link (``a`` is online)."""

    def _on_envelope(self, a, env) -> None:
        """Any other envelope from the server (e.g. ``command.update``); ignored here."""

    def _on_custom_timer(self, a, kind: str) -> None:
        """A timer of a kind not in ``BUILTIN_TIMERS`` fired for ``a`` (same connection generation)."""

    def _on_timer(self, idx, gen, kind) -> None:
        a = self.agents[idx]
        if gen != a.gen:
            return
        if kind == "connect":
            self._connect(a)
        elif kind == "heartbeat" and a.state == "online":
            self.c["heartbeats"] += 1
            self._send_env(a, "heartbeat")
            if a.state == "online":
                self._timer(time.monotonic() + a.hb_s, a, "heartbeat")
        elif kind == "connect_deadline" and a.state in ("connecting", "handshake"):
            self._drop(a, "timeouts")
        elif kind == "welcome_deadline" and a.state == "hello":
            self.c["welcome_timeouts"] = self.c.get("welcome_timeouts", 0) + 1  # upgraded, never welcomed
            self._drop(a, "timeouts")
        elif kind not in self.BUILTIN_TIMERS:
            self._on_custom_timer(a, kind)

    # ---------------------------------------------------------------- control

    def status(self) -> dict:
        return {
            "n": self.n, "online": self.online, "counters": self.c,
            "t_first_attempt": self.t_first_attempt, "t_all_online": self.t_all_online,
            "mark_t": self.mark_t, "mark_min_online": self.mark_min_online,
            "t_all_after_mark": self.t_all_after_mark,
            "sched": self.sched,
        }

    def storm_report(self) -> dict:
        """The storm's distributions (sorting 10,000 figures: asked for once, not in every status)."""
        return {
            "storm_welcome_s": {
                "n": len(self.mark_welcomes),
                **{f"p{p}": percentile(self.mark_welcomes, p) for p in (0, 50, 90, 99, 100)},
            },
            "storm_attempt_start_s": {f"p{p}": percentile(self.mark_attempt_starts, p) for p in (0, 50, 90, 100)},
            "storm_attempt_to_welcome_s": {f"p{p}": percentile(self.mark_handshakes, p) for p in (50, 90, 99, 100)},
        }

    def _handle_command(self, cmd: str) -> dict:
        """Act on one command line from the parent; return extra fields for the reply."""
        if cmd == "storm":
            return self.storm_report()
        if cmd == "mark":
            self.mark_t = time.monotonic()
            self.mark_min_online = self.online
            self.mark_welcomes, self.t_all_after_mark = [], None
            self.mark_attempt_starts, self.mark_handshakes = [], []
        elif cmd == "stop":
            self.stopping = True
        return {}

    def _command(self, line: str) -> None:
        cmd = line.strip()
        extra = self._handle_command(cmd)
        reply = self.status()
        reply.update(extra)
        reply["cmd"] = cmd
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        os.set_blocking(stdin, False)
        self.sel.register(stdin, selectors.EVENT_READ, None)
        pending = b""
        now = time.monotonic()
        for a in self.agents:
            self._timer(now, a, "connect")
        while not self.stopping:
            now = time.monotonic()
            if now > self.deadline:
                sys.stderr.write("load process: max runtime reached, exiting\n")
                break
            fired: dict[str, int] = {}
            while self.timers and self.timers[0][0] <= now:
                _, _, idx, gen, kind = heapq.heappop(self.timers)
                fired[kind] = fired.get(kind, 0) + 1
                try:
                    self._on_timer(idx, gen, kind)
                except Exception:  # noqa: BLE001 - one agent's surprise costs that link, not the run
                    self._drop(self.agents[idx], "errors")
            t_timers = time.monotonic()
            timeout = min(0.5, max(0.0, self.timers[0][0] - time.monotonic())) if self.timers else 0.5
            events = self.sel.select(timeout)
            t_select = time.monotonic()
            if t_select - now > 2.0:  # a slow turn of the loop: say where it went (load.log)
                sys.stderr.write(
                    f"load process: a turn took {t_select - now:.1f} s (timers {t_timers - now:.1f} s: {fired}; "
                    f"select {t_select - t_timers:.1f} s, {len(events)} events; heap {len(self.timers)})\n")
                sys.stderr.flush()
            for key, mask in events:
                a = key.data
                if a is None:  # a command from the parent (or EOF: the parent is gone)
                    chunk = os.read(stdin, 4096)
                    if not chunk:
                        self.stopping = True
                        break
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        self._command(line.decode())
                    continue
                if a.sock is None or key.fileobj is not a.sock:
                    continue
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._on_writable(a)
                    if mask & selectors.EVENT_READ and a.sock is not None and key.fileobj is a.sock:
                        self._on_readable(a)
                except Exception:  # noqa: BLE001 - as above
                    if a.sock is not None:
                        self._drop(a, "errors")
        for a in self.agents:
            if a.sock is not None:
                a.sock.close()


def load_worker(args) -> int:
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    LoadGen.sched = prompt_fleet()
    with open(args.tokens) as f:
        tokens = json.load(f)
    LoadGen(args.port, tokens, args.backoff_cap, args.max_runtime).run()
    return 0


class LoadProcess:
    """The parent's handle on the load process: a line protocol over its stdin/stdout.

    ``script`` (default: this file) is run with ``--load-worker`` and the arguments below, plus
    ``extra_args``; another benchmark passes its own file to run its LoadGen subclass.
    """

    def __init__(self, port: int, tokens_path: str, backoff_cap: float, max_runtime: float, log_path: str,
                 script: str | None = None, extra_args: tuple[str, ...] = ()):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script or __file__), "--load-worker", "--port", str(port),
             "--tokens", tokens_path, "--backoff-cap", str(backoff_cap), "--max-runtime", str(max_runtime),
             *extra_args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
        )

    def ask(self, cmd: str = "status", timeout: float = 60.0) -> dict:
        """One command, one answer. The timeout is generous: in a storm the load process shares two
        cores with 20,000 server threads, and on a slow machine its loop fell 10 s behind (an
        unanswered question would also leave the next answer out of step)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"load process exited with {self.proc.returncode}")
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"load process did not answer {cmd!r} within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load process closed its output")
        return json.loads(line)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask("stop", 5)
                self.proc.wait(10)
        except Exception:  # noqa: BLE001 - killed below anyway
            pass
        kill_group(self.proc, signal.SIGKILL, 2)
        self.log.close()


# =====================================================================================  orchestration


def enrol(env: dict, n: int) -> tuple[list[int], list[str], str]:
    """Enrol ``n`` hosts plus an admin with an API token in one transaction; return ids, tokens, api token."""
    from app import create_app
    from app.extensions import db
    from app.models import ApiToken, Host, User

    app = create_app(environ=env)
    with app.app_context():
        user = User.create("bench-admin", os.urandom(16).hex(), "admin")
        _, api_token = ApiToken.issue(user, "bench")
        hosts = [Host.enrol(f"bench-{i:05d}") for i in range(n)]
        db.session.flush()
        ids = [h.id for h, _ in hosts]
        tokens = [t for _, t in hosts]
        db.session.commit()
        db.engine.dispose()
    return ids, tokens, api_token


def db_connected(db_path: str) -> int:
    if db_path.startswith("postgresql"):
        return pg_connected(db_path)
    try:
        con = sqlite3.connect(db_path, timeout=5)
    except sqlite3.Error:
        return -1
    try:
        return con.execute("SELECT count(*) FROM hosts WHERE connected = 1").fetchone()[0]
    except sqlite3.Error:
        return -1
    finally:
        con.close()


_pg_engines: dict = {}


def pg_connected(url: str) -> int:
    import sqlalchemy as sa

    engine = _pg_engines.get(url) or _pg_engines.setdefault(url, sa.create_engine(url, pool_size=1))
    try:
        with engine.connect() as c:
            return c.execute(sa.text("SELECT count(*) FROM hosts WHERE connected")).scalar()
    except sa.exc.SQLAlchemyError:
        return -1


def listen_backlog(port: int) -> int | None:
    """The accept queue size the kernel really gave the listener (ss shows it as Send-Q)."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
        return int(out.split()[2])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def mb(kib) -> float:
    return kib / 1024.0


def run(args) -> dict:
    nofile = raise_nofile()
    n = args.agents
    tmp = tempfile.mkdtemp(prefix="rm-bench-agents-")
    private_pg = None
    if args.private_pg:  # a PostgreSQL of the bench's own: no other user's connections, its own limits
        from tests.support.cluster import PrivatePostgres

        private_pg = PrivatePostgres().init().start(max_connections=args.pg_max_connections)
        args.database_url = private_pg.url()
    db_path = os.path.join(tmp, "bench.sqlite3")
    db_url = "sqlite:///" + db_path
    if args.database_url:  # PostgreSQL: a schema of the bench's own; db_path is then that URL
        from cluster_dispatch import pg_schema_url

        db_path = db_url = pg_schema_url(args.database_url, args.schema)
    tune = {}
    if args.stack_kib is not None:
        tune["RM_THREAD_STACK_KIB"] = str(args.stack_kib)
    if args.switch_interval is not None:
        tune["RM_SWITCH_INTERVAL"] = str(args.switch_interval)
    if args.backlog is not None:
        tune["RM_AGENT_BACKLOG"] = str(args.backlog)
    if args.max_pending is not None:
        tune["RM_AGENT_MAX_PENDING"] = str(args.max_pending)
    if args.max_active is not None:
        tune["RM_AGENT_MAX_ACTIVE"] = str(args.max_active)
    env = server_env(
        tmp, db_url, RM_VERSION=VERSION, RM_HEARTBEAT_S=str(args.heartbeat),
        RM_HEARTBEAT_TIMEOUT=str(args.heartbeat * 3), RM_LOG_LEVEL=args.log_level, **tune,
    )
    database = ("private postgresql" if private_pg else "postgresql") if args.database_url else "sqlite"
    res: dict = {"agents": n, "workers": args.workers, "database": database,
                 "load_before": loadavg(), "heartbeat_s": args.heartbeat, "backoff_cap_s": args.backoff_cap,
                 "cpus": os.cpu_count(), "python": platform.python_version(), "tuning_env": tune,
                 "nofile_limit": nofile[0], "somaxconn": int(sysctl("net.core.somaxconn") or 0),
                 "tcp_max_syn_backlog": sysctl("net.ipv4.tcp_max_syn_backlog")}
    serve_args = ("--workers", str(args.workers)) if args.workers > 1 else ()
    server = Server(env, os.path.join(tmp, "server.log"), serve_args=serve_args)
    load = None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    try:
        t0 = time.monotonic()
        cli(env, "db", "upgrade")
        ids, tokens, api_token = enrol(env, n)
        tokens_path = os.path.join(tmp, "tokens.json")
        with open(tokens_path, "w") as f:
            json.dump(tokens, f)
        log(f"[bench] migrated and enrolled {n} hosts in {time.monotonic() - t0:.1f} s ({tmp})")

        import requests

        server.start()
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {api_token}"
        http.get(server.admin_url + "/api/version", timeout=10).raise_for_status()  # warm the admin plane
        time.sleep(1.0)
        st0 = group_status(server.pid)
        res["rss0_mb"], res["threads0"] = mb(st0["VmRSS"]), st0["Threads"]
        res["agent_backlog_effective"] = listen_backlog(server.agent_port)
        log(f"[bench] server pid {server.pid} admin :{server.admin_port} agents :{server.agent_port}; "
            f"idle RSS {res['rss0_mb']:.1f} MB, {res['threads0']} threads, "
            f"accept queue {res['agent_backlog_effective']}")

        # ---- connect N
        overflow0 = tcp_ext("ListenOverflows", "ListenDrops")
        res["load_connect"] = loadavg()
        cpu_c0 = group_cpu_seconds(server.pid)
        load = LoadProcess(server.agent_port, tokens_path, args.backoff_cap,
                           max_runtime=args.duration + args.connect_timeout + 3 * args.storm_timeout + 300,
                           log_path=os.path.join(tmp, "load.log"))
        deadline = time.monotonic() + args.connect_timeout
        peak_threads = 0
        while True:
            s = load.ask()
            peak_threads = max(peak_threads, group_status(server.pid).get("Threads", 0))
            if s["t_all_online"] is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {s['online']}/{n} agents welcomed after {args.connect_timeout} s: {s['counters']}")
            time.sleep(0.1)
        res["connect_all_s"] = s["t_all_online"] - s["t_first_attempt"]
        res["connect_server_cpu_s"] = group_cpu_seconds(server.pid) - cpu_c0
        welcomes = max(1, s["counters"]["welcomes"])
        res["connect_server_cpu_ms_per_welcome"] = 1000.0 * res["connect_server_cpu_s"] / welcomes
        res["connect_counters"] = dict(s["counters"])
        res["load_sched"] = s.get("sched")
        ov = tcp_ext("ListenOverflows", "ListenDrops")
        res["connect_listen_overflows"] = ov["ListenOverflows"] - overflow0["ListenOverflows"]
        log(f"[bench] all {n} welcomed in {res['connect_all_s']:.2f} s  {s['counters']}")

        # ---- hold N idle
        wait_db = time.monotonic() + 30
        while db_connected(db_path) < n and time.monotonic() < wait_db:
            time.sleep(0.2)
        res["db_connected_at_n"] = db_connected(db_path)
        cpu0, tc0 = group_cpu_seconds(server.pid), time.monotonic()
        samples = []
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            samples.append(group_status(server.pid))
            time.sleep(1.0)
        stn = group_status(server.pid)
        res["idle_cpu_pct"] = 100.0 * (group_cpu_seconds(server.pid) - cpu0) / (time.monotonic() - tc0)
        res["rss_n_mb"] = mb(stn["VmRSS"])
        res["rss_n_each_mb"] = [round(mb(x), 1) for x in stn["rss_each"]]
        res["load_idle"] = loadavg()
        res["rss_n_max_mb"] = mb(max(x.get("VmRSS", 0) for x in samples + [stn]))
        res["vmsize_n_mb"] = mb(stn["VmSize"])
        res["threads_n"] = stn["Threads"]
        res["threads_peak_connect"] = max(peak_threads, res["threads_n"])
        res["rss_per_conn_kib"] = (stn["VmRSS"] - st0["VmRSS"]) / n
        s = load.ask()
        res["online_after_idle"] = s["online"]
        log(f"[bench] idle {args.duration:.0f} s at N={n}: RSS {res['rss_n_mb']:.1f} MB "
            f"({res['rss_per_conn_kib']:.1f} KiB/conn), {res['threads_n']} threads, CPU {res['idle_cpu_pct']:.1f} %")

        # ---- round trip to one agent while N are idle
        target = ids[len(ids) // 2]
        rtts, https, fails = [], [], []
        end = time.monotonic() + args.ping_timeout
        for _ in range(args.pings):
            if time.monotonic() > end:
                break
            t = time.perf_counter()
            r = http.post(f"{server.admin_url}/api/hosts/{target}/ping", timeout=10)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                fails.append(f"{r.status_code} {r.text[:200]}")
                continue
            rtts.append(r.json()["rtt_ms"])
            https.append(dt * 1000.0)
        res["pings"] = len(rtts)
        res["ping_failures"] = len(fails)
        res["ping_failure_samples"] = fails[:5]
        for p in (50, 99):
            res[f"ping_rtt_p{p}_ms"] = percentile(rtts, p)
            res[f"ping_http_p{p}_ms"] = percentile(https, p)
        log(f"[bench] {len(rtts)} pings: rtt p50 {res['ping_rtt_p50_ms']} ms p99 {res['ping_rtt_p99_ms']} ms; "
            f"HTTP p50 {res['ping_http_p50_ms']:.2f} ms p99 {res['ping_http_p99_ms']:.2f} ms")

        # ---- reconnect storm
        overflow0 = tcp_ext("ListenOverflows", "ListenDrops")
        res["load_storm"] = loadavg()
        c_before = load.ask("mark")["counters"]
        t_term = time.monotonic()
        server.stop()
        t_down = time.monotonic()
        res["shutdown_s"] = t_down - t_term
        server.start(RM_HTTP_ADDR=f"127.0.0.1:{server.admin_port}", RM_AGENT_ADDR=f"127.0.0.1:{server.agent_port}")
        t_ready = time.monotonic()
        res["restart_listen_s"] = t_ready - t_term
        log(f"[bench] restarted: down in {res['shutdown_s']:.2f} s, listening again {res['restart_listen_s']:.2f} s "
            f"after SIGTERM; waiting for {n} agents")
        t_db_all = None
        peak_threads = 0
        deadline = t_ready + args.storm_timeout
        while True:
            s = load.ask()
            peak_threads = max(peak_threads, group_status(server.pid).get("Threads", 0))
            if t_db_all is None and db_connected(db_path) >= n:
                t_db_all = time.monotonic()
            if s["t_all_after_mark"] is not None and t_db_all is not None:
                break
            if time.monotonic() > deadline:
                res["storm_stuck"] = {"online": s["online"], "db_connected": db_connected(db_path),
                                      "counters": s["counters"]}
                break
            time.sleep(0.05)
        s.update(load.ask("storm"))
        ov = tcp_ext("ListenOverflows", "ListenDrops")
        res["storm_listen_overflows"] = ov["ListenOverflows"] - overflow0["ListenOverflows"]
        res["storm_listen_drops"] = ov["ListenDrops"] - overflow0["ListenDrops"]
        res["storm_counters"] = {k: v - c_before.get(k, 0) for k, v in s["counters"].items()}
        res["storm_min_online"] = s["mark_min_online"]
        res["storm_server_cpu_s"] = group_cpu_seconds(server.pid)  # the new process's whole life: start-up + storm
        if s["t_all_after_mark"] is not None:
            res["storm_all_welcomed_after_sigterm_s"] = s["t_all_after_mark"] - t_term
            res["storm_all_welcomed_after_listen_s"] = s["t_all_after_mark"] - t_ready
        if t_db_all is not None:  # polled every ~50 ms, so up to that late
            res["storm_all_db_connected_after_sigterm_s"] = t_db_all - t_term
        res["storm_welcome_s_after_sigterm"] = s["storm_welcome_s"]
        # The agents' schedule apart from the server's pace: when the attempts that were welcomed
        # started (after SIGTERM), how long each took, and the server's welcome rate from its first
        # welcome to its last (only backoff-free while attempts overlap: compare attempt starts).
        res["storm_attempt_start_s_after_sigterm"] = s["storm_attempt_start_s"]
        res["storm_attempt_to_welcome_s"] = s["storm_attempt_to_welcome_s"]
        sw = s["storm_welcome_s"]
        span = (sw["p100"] or 0) - (sw["p0"] or 0)
        res["storm_welcomes_per_s"] = sw["n"] / span if span > 0 else None
        res["threads_peak_storm"] = peak_threads
        log(f"[bench] storm: all welcomed {res.get('storm_all_welcomed_after_sigterm_s')} s after SIGTERM, "
            f"DB {res.get('storm_all_db_connected_after_sigterm_s')} s")
        time.sleep(2.0)
        st = group_status(server.pid)
        res["rss_after_storm_mb"], res["threads_after_storm"] = mb(st.get("VmRSS", 0)), st.get("Threads", 0)
        t = time.perf_counter()
        hosts = http.get(server.admin_url + "/api/hosts", timeout=60).json()["hosts"]
        res["api_hosts_list_s"] = time.perf_counter() - t
        res["api_online_after_storm"] = sum(1 for h in hosts if h["online"])
        res["load_after"] = loadavg()
        log(f"[bench] GET /api/hosts: {res['api_online_after_storm']}/{n} online ({res['api_hosts_list_s']:.2f} s)")
    except Exception as e:  # noqa: BLE001 - report what was measured, and why the rest was not
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"[bench] FAILED: {res['error']}")
        args.keep = True
    finally:
        try:
            lines = server.log_tail(10**9).splitlines()
            res["server_log_errors"] = sum(1 for ln in lines if " ERROR " in ln or "Traceback" in ln)
            # the window each stopping process asked its agents to return over (app/agents/server.py)
            from agent.protocol import reconnect_spread
            res["restart_named_spread_s"] = [
                reconnect_spread(ln) for ln in lines if "stopped in" in ln and "agent sockets" in ln]
        except Exception:  # noqa: BLE001
            pass
        if load is not None:
            load.stop()
        server.stop()
        if private_pg is not None:
            private_pg.remove()
        if args.keep:
            print(f"[bench] kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    res["target_rss_ok"] = (
        res.get("rss_n_mb", 1e9) <= TARGET_RSS_MB and res.get("rss_after_storm_mb", 1e9) <= TARGET_RSS_MB)
    storm_target = TARGET_STORM_WORKERS_S if args.workers > 1 else TARGET_STORM_S
    res["target_storm_s"] = storm_target
    res["target_storm_ok"] = res.get("storm_all_welcomed_after_sigterm_s", 1e9) <= storm_target and \
        res.get("storm_all_db_connected_after_sigterm_s", 1e9) <= storm_target
    return res


def report(res: dict) -> None:
    def f(key, fmt="{:.2f}"):
        v = res.get(key)
        return "n/a" if v is None else fmt.format(v)

    sw = res.get("storm_welcome_s_after_sigterm") or {}
    rows = [
        ("agents (N)", res["agents"]),
        ("server processes / database", f"{res['workers']} worker(s) / {res['database']}"),
        ("machine load (1/5/15 min): before / connect / idle at N / storm / after",
         " / ".join(str(res.get(k)) for k in ("load_before", "load_connect", "load_idle", "load_storm", "load_after"))),
        ("tuning env", " ".join(f"{k}={v}" for k, v in res["tuning_env"].items()) or "(server defaults)"),
        ("machine", f"{res['cpus']} CPUs, Python {res['python']}, somaxconn {res['somaxconn']}, "
                    f"nofile {res['nofile_limit']}"),
        ("agent accept queue (effective)", res.get("agent_backlog_effective")),
        ("server RSS / threads, 0 agents", f"{f('rss0_mb', '{:.1f}')} MB / {res.get('threads0')}"),
        ("all N connected (first connect -> all welcomed)", f"{f('connect_all_s')} s"),
        ("server CPU while connecting (per welcome)",
         f"{f('connect_server_cpu_s')} s ({f('connect_server_cpu_ms_per_welcome')} ms)"),
        ("server RSS at N idle (max while idle)", f"{f('rss_n_mb', '{:.1f}')} MB ({f('rss_n_max_mb', '{:.1f}')} MB)"),
        ("RSS per process at N (parent first)", " + ".join(f"{x:.0f}" for x in res.get("rss_n_each_mb", [])) + " MB"),
        ("RSS per idle connection", f"{f('rss_per_conn_kib', '{:.1f}')} KiB"),
        ("server threads at N idle (peak while connecting)",
         f"{res.get('threads_n')} ({res.get('threads_peak_connect')})"),
        ("server VmSize at N", f"{f('vmsize_n_mb', '{:.0f}')} MB"),
        ("server CPU at N idle", f"{f('idle_cpu_pct', '{:.1f}')} %"),
        ("ping rtt_ms (server) p50 / p99", f"{f('ping_rtt_p50_ms', '{:.2f}')} / {f('ping_rtt_p99_ms', '{:.2f}')} ms"
                                          f"  ({res.get('pings')} pings, {res.get('ping_failures')} failed)"),
        ("ping HTTP round trip p50 / p99", f"{f('ping_http_p50_ms', '{:.2f}')} / {f('ping_http_p99_ms', '{:.2f}')} ms"),
        ("load process scheduling (scripts/bench/_common.py prompt_fleet)", res.get("load_sched")),
        ("restart: SIGTERM -> exited", f"{f('shutdown_s')} s"),
        ("restart: SIGTERM -> listening again", f"{f('restart_listen_s')} s"),
        ("restart: return window each process named (s; None: the agents' 4 s rule)",
         res.get("restart_named_spread_s")),
        ("storm: all N welcomed (after SIGTERM / after listen)",
         f"{f('storm_all_welcomed_after_sigterm_s')} s / {f('storm_all_welcomed_after_listen_s')} s"),
        ("storm: all N connected in DB (after SIGTERM)", f"{f('storm_all_db_connected_after_sigterm_s')} s"),
        ("storm: new server's CPU, start-up + storm", f"{f('storm_server_cpu_s')} s"),
        ("storm: welcome times p50/p90/p99 after SIGTERM",
         " / ".join("n/a" if sw.get(k) is None else f"{sw[k]:.2f}" for k in ("p50", "p90", "p99")) + " s"),
        ("storm: welcomed attempts started p0/p50/p90/p100 after SIGTERM (agents' backoff)",
         " / ".join("n/a" if v is None else f"{v:.2f}"
                    for v in (res.get("storm_attempt_start_s_after_sigterm") or {}).values()) + " s"),
        ("storm: attempt -> welcome p50/p90/p99/p100 (server's side)",
         " / ".join("n/a" if v is None else f"{v:.2f}"
                    for v in (res.get("storm_attempt_to_welcome_s") or {}).values()) + " s"),
        ("storm: server welcomes/s, first to last welcome", f('storm_welcomes_per_s', "{:.0f}")),
        ("storm: attempts / refused / timeouts / resets",
         " / ".join(str(res.get("storm_counters", {}).get(k, 0))
                    for k in ("attempts", "refused", "timeouts", "resets"))),
        ("storm: listen overflows / drops (kernel)",
         f"{res.get('storm_listen_overflows')} / {res.get('storm_listen_drops')}"),
        ("storm: peak threads; RSS / threads after",
         f"{res.get('threads_peak_storm')}; {f('rss_after_storm_mb', '{:.1f}')} MB / {res.get('threads_after_storm')}"),
        ("GET /api/hosts online after storm (time)", f"{res.get('api_online_after_storm')}/{res['agents']} "
                                                     f"({f('api_hosts_list_s')} s)"),
        ("server log ERROR/Traceback lines", res.get("server_log_errors")),
        (f"target RSS <= {TARGET_RSS_MB} MB (one process)", "PASS" if res["target_rss_ok"] else "FAIL"),
        (f"target back online <= {res['target_storm_s']:g} s", "PASS" if res["target_storm_ok"] else "FAIL"),
    ]
    if res.get("error"):
        rows.append(("RUN FAILED", res["error"]))
    if res.get("storm_stuck"):
        rows.append(("storm did not complete", json.dumps(res["storm_stuck"])))
    print_table(f"restic-manager agent-plane capacity (N={res['agents']})", rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=2000, help="number of agent connections (default 2000)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds to hold N idle before measuring (default 20)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--pings", type=int, default=200, help="round trips to one agent (default 200)")
    ap.add_argument("--heartbeat", type=float, default=15.0, help="RM_HEARTBEAT_S for the server (default 15)")
    ap.add_argument("--backoff-cap", type=float, default=DEFAULT_BACKOFF_MAX_S,
                    help=f"agents' reconnect backoff cap, s (default {DEFAULT_BACKOFF_MAX_S:g}: the real agent's)")
    ap.add_argument("--stack-kib", type=int, default=None, help="RM_THREAD_STACK_KIB for the server (0 = libc default)")
    ap.add_argument("--switch-interval", type=float, default=None, help="RM_SWITCH_INTERVAL for the server")
    ap.add_argument("--backlog", type=int, default=None, help="RM_AGENT_BACKLOG for the server (listen backlog)")
    ap.add_argument("--max-pending", type=int, default=None, help="RM_AGENT_MAX_PENDING for the server")
    ap.add_argument("--max-active", type=int, default=None, help="RM_AGENT_MAX_ACTIVE for the server (0: no work gate)")
    ap.add_argument("--log-level", default="INFO", help="RM_LOG_LEVEL for the server (default INFO)")
    ap.add_argument("--connect-timeout", type=float, default=180.0, help="give up connecting N after this many s")
    ap.add_argument("--storm-timeout", type=float, default=90.0, help="give up on the storm after this many s")
    ap.add_argument("--ping-timeout", type=float, default=60.0, help="stop pinging after this many s")
    ap.add_argument("--workers", type=int, default=1,
                    help="serve --workers N (needs --database-url: PostgreSQL); RSS and CPU summed over all")
    ap.add_argument("--database-url", default=os.environ.get("RM_BENCH_DATABASE_URL"),
                    help="PostgreSQL URL (default: a fresh SQLite file); the bench owns --schema on it")
    ap.add_argument("--schema", default="rm_bench_agents", help="schema dropped and migrated on --database-url")
    ap.add_argument("--private-pg", action="store_true",
                    help="start a PostgreSQL of the bench's own (initdb/pg_ctl in a temp folder) instead")
    ap.add_argument("--pg-max-connections", type=int, default=400, help="max_connections of --private-pg")
    ap.add_argument("--keep", action="store_true", help="keep the temporary instance folder (logs)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    # internal: the load process
    ap.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--max-runtime", type=float, default=900.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_worker:
        return load_worker(args)
    if args.agents < 1:
        ap.error("--agents must be at least 1")
    if args.workers > 1 and not (args.database_url or args.private_pg):
        ap.error("--workers > 1 needs --database-url (PostgreSQL): SQLite serves one process")
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        report(res)
    return 0 if res["target_rss_ok"] and res["target_storm_ok"] and not res.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
