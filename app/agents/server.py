"""The agent plane's HTTP server: werkzeug's threaded server, made fit for a public port.

werkzeug gives each TCP connection a thread. On a port that anyone can reach, and that carries
long-lived WebSockets, that needs three bounds werkzeug does not have (issue 9, items 12-14):

* **Pending connections.** From accept until its request authenticates (the agent token is
  accepted) or ends, a connection is *pending*. Each gets ``handshake_timeout`` seconds in all
  (a total deadline, not per read, so a byte every few seconds does not extend it); then the
  server shuts its socket. At most ``max_pending`` are pending at once; beyond that a connection
  is answered ``503`` with ``Retry-After`` from the accepting thread, without a thread of its own.
* **After a WebSocket.** The socket belongs to the WebSocket once upgraded (simple-websocket
  writes the ``101``). flask-sock's route still returns a response when the socket ends, which
  werkzeug would write onto the upgraded socket (``HTTP/1.1 200 OK`` and HTML headers after the
  close frame; flask-sock issues #20, #77) and log as ``200``: :class:`AgentRequestHandler`
  swallows it and logs ``101``.
* **Given up.** A connection whose peer has already closed its side when it is accepted (it
  waited in the listen backlog past the agent's connect timeout, in a reconnect storm on a loaded
  machine) is closed at once, without a thread: serving it would spend a whole handshake on a
  socket nobody reads, while the agent already retries on a new one. (An HTTP client that
  half-closes after its request would be dropped too; neither the agent nor curl/wget does.)
* **Closing.** After the close handshake, or a bounded wait (``close_timeout``) for the peer's
  close frame, the server closes the TCP connection itself: a peer that answers the close and
  keeps the socket open no longer holds a thread.

With a TLS context (``RM_AGENT_TLS_CERT``/``RM_AGENT_TLS_KEY``) the accepting thread only wraps
each accepted socket (no I/O); the TLS handshake runs first thing on the connection's own
thread, inside the pending deadline. A connection refused with 503 before its handshake is
simply closed (the answer cannot be written in the clear).
"""

from __future__ import annotations

import collections
import io
import logging
import math
import socket
import ssl
import threading
import time

from werkzeug.serving import ThreadedWSGIServer
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from agent.transport import RESTART_RETRY_S

from ..errors import error_bytes
from .requestlog import RequestLogHandler

log = logging.getLogger(__name__)

#: environ key of a callable: the app calls it once the request's agent token is accepted.
AUTHENTICATED = "rm.agent_plane.authenticated"
#: environ key of the upgraded connection's ``simple_websocket.Server``, set when it starts reading.
WEBSOCKET = "rm.agent_plane.websocket"
#: environ key of the request's :class:`Turn` at the server's :class:`WorkGate`.
TURN = "rm.agent_plane.turn"
#: environ key of a callable: the app calls it once the agent is welcomed (:class:`WelcomeRate`).
WELCOMED = "rm.agent_plane.welcomed"

#: How long a refused (503) connection may take to read its answer before it is closed.
REFUSED_LINGER_S = 1.0
#: How often the accepting thread looks for pending connections past their deadline.
SWEEP_S = 0.1
#: With ``max_pending`` connections pending, new ones wait in the listen backlog while the pending
#: ones make progress; only after this long without one of them ending (or a quarter of the
#: handshake timeout, if shorter) is the next one refused.
FULL_HOLD_S = 1.0
#: At most one warning about refused connections per this many seconds.
REPORT_S = 10.0
#: ``tcpi_state`` of a socket whose peer has closed its side (Linux's ``TCP_CLOSE_WAIT``).
TCP_CLOSE_WAIT = 8
#: The welcome rate is known once the process has been saturated for at least this long.
RATE_WINDOW_S = 3.0
#: Two saturated welcomes further apart than this are not one stretch of work (a lull between two
#: storms, each ending and starting with others waiting): the gap is not counted.
RATE_MAX_GAP_S = 1.0
#: How often the welcome rate reads the process's CPU clock (each reading sums over its threads).
CPU_TICK_S = 1.0
#: A second counts towards the CPU a welcome costs when it has at least this many welcomes: a
#: lone welcome's second is mostly the process's other work.
CPU_MIN_WELCOMES = 5
#: Welcomes in such seconds before their cost is taken as known.
CPU_MIN_SAMPLE = 100
#: Of an agent's 10 s connect timeout, how long its return after a restart may wait in a queue:
#: the window a stop names is what it takes to welcome the fleet, less this.
QUEUE_BUDGET_S = 3.0


def peer_gave_up(sock: socket.socket) -> bool:
    """True when the peer of this freshly accepted socket has already closed its side (Linux)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:  # not Linux: no cheap way to ask, serve it
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] == TCP_CLOSE_WAIT
    except OSError:
        return False


def mark_authenticated(environ) -> None:
    """Tell the agent-plane server this request's connection is an authenticated agent's."""
    hook = environ.get(AUTHENTICATED)
    if hook is not None:
        hook()


def mark_welcomed(environ) -> None:
    """Tell the agent-plane server this request's agent was welcomed (:class:`WelcomeRate`)."""
    hook = environ.get(WELCOMED)
    if hook is not None:
        hook()


class WelcomeRate:
    """How fast this process welcomes agents when it has more than it can take at once.

    A welcome counts while others wait for a turn (or in the listen backlog): then the pace is
    the process's, not the agents' arrival rate. The rate is the mean over all such time in the
    process's life (welcomes between saturated welcomes, over the time between them), once there
    is at least ``window`` seconds of it: the mean, not the best few seconds, because the storm
    it sizes runs on a process just started, with its restart's own work (at 6,000 agents on 4
    workers a window sized from the best 3 s expected 290 welcomes a second and the storm ran at
    160; docs/capacity.md). A stop uses it to name the window over which its agents should come
    back (:meth:`AgentServer.restart_spread`).

    A process that was never saturated has not seen its pace, only its agents' arrivals: it
    estimates the pace from what a welcome costs it instead, the CPU the whole process spent
    over busy seconds (at least ``CPU_MIN_WELCOMES`` welcomes in one) per welcome, and the share of
    the machine's cores it may count on (``cpu_share``: one core at most, the GIL's, divided among
    the machine's workers). Without it, 10,000 agents connected in 20 s without saturating 3 of
    4 workers, whose stops then named nothing and had their 2,500 agents each back within 4 s:
    3,204 agents timed out in that storm (docs/capacity.md). A process that has welcomed fewer
    than ``CPU_MIN_SAMPLE`` agents in busy seconds names none, and the agents' own rule applies
    (agent.transport.Backoff).
    """

    def __init__(
        self,
        window: float = RATE_WINDOW_S,
        clock=time.monotonic,
        max_gap: float = RATE_MAX_GAP_S,
        cpu_clock=time.process_time,
        cpu_share: float = 1.0,
    ):
        self.window = window
        self.clock = clock
        self.max_gap = max_gap
        self.cpu_clock = cpu_clock
        self.cpu_share = cpu_share
        self._busy_s = 0.0  # time between consecutive saturated welcomes
        self._count = 0  # welcomes that closed such an interval
        self._last: float | None = None  # the last welcome, if it was a saturated one
        # The CPU a welcome costs: read at most once a second (it sums over every thread).
        self._tick_at: float | None = None
        self._tick_cpu = 0.0
        self._tick_n = 0  # welcomes since the last reading
        self._cpu_s = 0.0  # process CPU over busy seconds
        self._cpu_n = 0  # welcomes in them
        self._lock = threading.Lock()

    def record(self, saturated: bool) -> None:
        now = self.clock()
        with self._lock:
            if saturated and self._last is not None and now - self._last <= self.max_gap:
                self._busy_s += now - self._last
                self._count += 1
            self._last = now if saturated else None
            if self._tick_at is None or now - self._tick_at >= CPU_TICK_S:
                cpu = self.cpu_clock()
                busy = self._tick_n >= CPU_MIN_WELCOMES
                if busy and self._tick_at is not None and now - self._tick_at <= 2 * CPU_TICK_S:
                    self._cpu_s += cpu - self._tick_cpu
                    self._cpu_n += self._tick_n
                self._tick_at, self._tick_cpu, self._tick_n = now, cpu, 0
            self._tick_n += 1

    @property
    def rate(self) -> float | None:
        """Welcomes a second while saturated; before ``window`` seconds of that, the pace the CPU
        a welcome costs allows; None before either is known."""
        with self._lock:
            if self._busy_s >= self.window:
                return self._count / self._busy_s
            if self._cpu_n >= CPU_MIN_SAMPLE and self._cpu_s > 0:
                return self.cpu_share * self._cpu_n / self._cpu_s
            return None


def restart_spread(held: int, rate: float | None) -> float | None:
    """The window (s) a stop asks its ``held`` agents to spread their return over, or None.

    Agents told nothing all come back within RESTART_RETRY_S (4 s) of the close. When welcoming
    them takes longer than that plus QUEUE_BUDGET_S, the late ones wait in the listen queue past
    their connect timeout and come back again, paying their handshake twice: 10,000 agents on 4
    workers came back in waves, in 22-32 s (docs/capacity.md, issue 13). Spread over the time
    the process measured it needs, less what they may wait, they arrive about as fast as they
    are welcomed.
    """
    if rate is None or rate <= 0 or held <= 0:
        return None
    spread = held / rate - QUEUE_BUDGET_S
    return round(spread, 1) if spread > RESTART_RETRY_S else None


class WorkGate:
    """At most ``size`` connections of this process do handshake work at once (issue 13).

    A reconnect storm brings thousands of sockets at once. Given a thread each and let run, they
    all want the GIL: every waiter wakes every switch interval to ask for it, the holder is made to
    drop it, and the process spends its cores handing the GIL around instead of welcoming agents
    (10,000 agents on 4 workers: load average 800, database pool checkouts timing out after 30 s,
    13 ms of CPU per welcome against 4 at 2,000). Behind the gate the rest sleep on a condition,
    without timed wake-ups, until a turn is free.

    A turn covers the CPU-bound stretches of a handshake: from the parsed request to the ``101``
    (the token lookup and the WebSocket handshake), and from the hello to the welcome (its record
    and the reconcile). It is handed back while the agent's hello is on its way, so a slow network
    costs no turn. A connection coming back for its second stretch goes before new ones: finishing
    a started handshake is worth more than starting another (its agent's clock is running).
    """

    def __init__(self, size: int):
        self.size = size
        lock = threading.Lock()
        self._new = threading.Condition(lock)
        self._resume = threading.Condition(lock)  # second stretches: they go first
        self._busy = 0
        self._resuming = 0
        self._waiting = 0

    def acquire(self, timeout: float | None, resuming: bool = False) -> bool:
        with self._new:
            self._waiting += 1
            try:
                if resuming:
                    self._resuming += 1
                    try:
                        ok = self._resume.wait_for(lambda: self._busy < self.size, timeout)
                    finally:
                        self._resuming -= 1
                    if not ok and self._busy < self.size:  # a turn it was woken for: pass it on
                        self._new.notify()
                else:
                    ok = self._new.wait_for(lambda: self._busy < self.size and not self._resuming, timeout)
            finally:
                self._waiting -= 1
            if ok:
                self._busy += 1
            return ok

    def release(self) -> None:
        with self._new:
            self._busy -= 1
            (self._resume if self._resuming else self._new).notify()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        """Connections waiting for a turn right now."""
        return self._waiting


class Turn:
    """One request's claim on the :class:`WorkGate`; :func:`pause` and :func:`resume` use it."""

    __slots__ = ("gate", "held")

    def __init__(self, gate: WorkGate):
        self.gate = gate
        self.held = False

    def take(self, timeout: float | None, resuming: bool = False) -> bool:
        if not self.held:
            self.held = self.gate.acquire(timeout, resuming)
        return self.held

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


def pause(environ) -> None:
    """Hand back this request's turn while it waits on the network (the agent's hello)."""
    turn = environ.get(TURN)
    if turn is not None:
        turn.give_back()


def resume(environ, timeout: float) -> bool:
    """Take a turn again for the next CPU-bound stretch; False if none came within ``timeout``."""
    turn = environ.get(TURN)
    return True if turn is None else turn.take(timeout, resuming=True)


class WebSocketReader(threading.Thread):
    """simple-websocket's reader thread (``SOCK_SERVER_OPTIONS["thread_class"]``).

    It records the upgraded socket in the request's environ, for :class:`AgentRequestHandler`.
    And when it ends it wakes a waiting ``receive()``: simple-websocket signals an incoming close
    (or its own 1009) *before* it marks the socket closed, so a ``receive(timeout)`` that woke in
    between went back to sleep for its whole timeout (the 10 s hello wait after an oversized
    first frame).
    """

    def __init__(self, *args, target=None, **kwargs):
        super().__init__(*args, target=target, **kwargs)
        self.websocket = getattr(target, "__self__", None)
        environ = getattr(self.websocket, "environ", None)
        if environ is not None:
            environ[WEBSOCKET] = self.websocket

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.websocket is not None:
                self.websocket.event.set()


class _Discard(io.RawIOBase):
    """Where the response written after a WebSocket goes: nowhere."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


class AgentRequestHandler(RequestLogHandler):
    """werkzeug's request handler, aware of pending connections and of upgraded sockets (and whose
    request log has no colour codes off a terminal: :mod:`app.agents.requestlog`)."""

    server: AgentServer
    _turn: Turn | None = None  # this request's claim on the server's WorkGate, if it has one

    def make_environ(self):
        environ = super().make_environ()
        environ[AUTHENTICATED] = self._authenticated
        environ[WELCOMED] = self.server.welcomed
        if self._turn is not None:
            environ[TURN] = self._turn
        return environ

    def _authenticated(self) -> None:
        self.server.authenticated(self.connection)

    def handle(self) -> None:
        try:
            if isinstance(self.connection, ssl.SSLSocket) and not self._tls_handshake():
                return
            super().handle()
        finally:
            self.server.release(self.connection)

    def _tls_handshake(self) -> bool:
        """Complete the TLS handshake; the pending deadline cuts a peer that stalls it."""
        try:
            self.connection.do_handshake()
        except ssl.SSLError as exc:  # e.g. the agent does not trust our certificate: say so
            log.info("agent plane: TLS handshake with %s failed: %s", self.client_address[0], exc)
            return False
        except OSError as exc:  # cut at the deadline, a reset, a port scan
            log.debug("agent plane: TLS handshake with %s failed: %s", self.client_address[0], exc)
            return False
        return True

    def send_response(self, code, message=None) -> None:
        if self._websocket() is None:
            super().send_response(code, message)
            return
        # The WebSocket has ended: what the route returns now is not for the wire, and neither
        # is werkzeug's drain of the request body (it would block on the peer's close frame).
        self._wire = (self.rfile, self.wfile)
        self.wfile = _Discard()
        self.rfile = io.BytesIO()
        self.close_connection = True
        if not self.server.closing:  # a stop closes them all at once: one summary line says so (app/serve.py)
            self.log_request(101)

    def run_wsgi(self) -> None:
        self._turn = turn = None if self.server.gate is None else Turn(self.server.gate)
        if turn is not None and not self._take_turn(turn):
            self.close_connection = True
            return
        try:
            super().run_wsgi()
        finally:
            if turn is not None:
                turn.give_back()
        ws = self._websocket()
        if ws is not None:
            self._close_websocket(ws)

    def _take_turn(self, turn: Turn) -> bool:
        """Wait for a turn at the gate, at most until the connection's pending deadline. False when
        none came, or when the agent gave up while it waited: nothing is answered then."""
        remaining = self.server.pending_deadline(self.connection) - self.server.clock()
        if not math.isfinite(remaining) or not turn.take(max(0.0, remaining)):  # inf: cut by the sweep
            log.debug("agent plane: no turn for %s within its handshake deadline", self.client_address[0])
            return False
        if peer_gave_up(self.connection):
            turn.give_back()
            self.server.count_abandoned()
            return False
        return True

    def _websocket(self):
        environ = getattr(self, "environ", None)
        return environ.get(WEBSOCKET) if environ else None

    def _close_websocket(self, ws) -> None:
        """Finish the close handshake (bounded), then close the TCP connection from this side."""
        deadline = time.monotonic() + self.server.close_timeout
        if ws.connected:  # the route ended without closing (an exception): close it now
            try:
                ws.close(1011, "server error")
            except Exception:  # noqa: BLE001 - the socket may be gone already
                pass
        # The reader ends when the peer answers our close frame, sends its own, or goes away.
        ws.thread.join(max(0.0, deadline - time.monotonic()))
        if not ws.thread.is_alive() and ws.ws.state is not ConnectionState.CLOSED:
            # It stopped at our own close (1009) without reading the peer's answer: read it here.
            self._await_close_frame(ws, deadline)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # also wakes a reader still in recv()
        except OSError:
            pass
        for f in getattr(self, "_wire", ()):
            try:
                f.close()  # the socket's descriptor is freed once its file objects are closed
            except OSError:
                pass

    def _await_close_frame(self, ws, deadline: float) -> None:
        sock = self.connection
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                sock.settimeout(remaining)
                data = sock.recv(65536)
                if not data:
                    return
                ws.ws.receive_data(data)
                if any(isinstance(event, CloseConnection) for event in ws.ws.events()):
                    return
            except Exception:  # noqa: BLE001 - timeout, reset or a protocol error: stop waiting
                return


class AgentServer(ThreadedWSGIServer):
    """werkzeug's threaded server with a listen backlog sized for reconnect storms, a cap and a
    deadline on pending connections, and WebSocket-aware request handling (see the module).

    Everything slow happens on the connection's own thread, never in the accept loop (which
    also runs the deadline sweep). TLS keeps it so: wrapping the *listening* socket (as
    werkzeug's ``ssl_context`` does) would run each TLS handshake inside ``accept()``, where one
    silent client would stall the whole port. Instead :meth:`get_request` wraps each accepted
    socket without a handshake (the same object is then the pending entry, the handler's
    connection and what the sweep shuts down), and :class:`AgentRequestHandler` shakes hands on
    the connection's thread, so the pending deadline covers the TLS handshake too.
    """

    request_queue_size = 4096

    def __init__(
        self,
        host: str,
        port: int,
        app,
        backlog: int,
        handshake_timeout: float = 10.0,
        max_pending: int = 256,
        close_timeout: float = 5.0,
        clock=time.monotonic,
        tls: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        max_active: int = 0,
        cpu_share: float = 1.0,
    ):
        self.request_queue_size = backlog
        #: ``max_active`` > 0: at most that many connections do handshake work at once (WorkGate).
        self.gate = WorkGate(max_active) if max_active > 0 else None
        self.welcome_rate = WelcomeRate(clock=clock, cpu_share=cpu_share)
        # ``serve --workers N``: every worker listens on the same port; the kernel spreads accepts.
        self.allow_reuse_port = reuse_port
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.full_hold = min(FULL_HOLD_S, handshake_timeout / 4)
        self.close_timeout = close_timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a pending connection ends
        self._last_room = clock()  # when one last did
        self._pending: dict[socket.socket, float] = {}  # socket -> deadline (inf once cut)
        self._refused: collections.deque[tuple[socket.socket, float]] = collections.deque()
        self._refused_count = 0
        self._abandoned_count = 0  # accepted after their peer gave up (see the module)
        #: Set when the listener closes (a stop): the sockets' request lines are not logged then.
        self.closing = False
        self._next_sweep = self._next_report = 0.0
        super().__init__(host, port, app, handler=AgentRequestHandler)
        # Not werkzeug's ssl_context argument (see the class); set here, it still makes werkzeug
        # report wsgi.url_scheme "https" and treat SSL errors as dropped connections.
        self.ssl_context = tls

    def get_request(self):
        """Accept, with TCP_NODELAY: agent sockets carry small frames, often two in a row (a
        command, then a pong); Nagle would hold the second until the peer's delayed ACK (~40 ms).
        On a TLS plane, wrap the socket too, without a handshake (see the class)."""
        sock, addr = super().get_request()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (or already gone): nothing to tune
            pass
        if self.ssl_context is not None:
            # No I/O here: the handshake runs on the connection's thread (AgentRequestHandler).
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    # -- pending connections -------------------------------------------------------------

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def process_request(self, request, client_address) -> None:
        if peer_gave_up(request):
            self.count_abandoned()
            request.close()
            return
        with self._lock:
            admit = len(self._pending) < self.max_pending
            if admit:
                self._pending[request] = self.clock() + self.handshake_timeout
        if not admit:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.release(request)
            raise

    def pending_deadline(self, request) -> float:
        """When this pending connection's handshake time runs out (inf once cut by the sweep)."""
        with self._lock:
            return self._pending.get(request, math.inf)

    def welcomed(self) -> None:
        """An agent was welcomed: count it towards the rate if others are waiting (WelcomeRate)."""
        waiting = self.gate is not None and self.gate.waiting > 0
        self.welcome_rate.record(waiting or self.pending >= self.max_pending)

    def restart_spread(self, held: int) -> float | None:
        """The window a stop asks its ``held`` agents to come back over (:func:`restart_spread`)."""
        return restart_spread(held, self.welcome_rate.rate)

    def count_abandoned(self) -> None:
        with self._lock:
            self._abandoned_count += 1

    def authenticated(self, request) -> None:
        self.release(request)

    def release(self, request) -> None:
        with self._lock:
            deadline = self._pending.pop(request, None)
            if deadline is not None:
                if deadline != math.inf:  # it ended by itself: the pending set is moving (not cut by the sweep)
                    self._last_room = self.clock()
                self._room.notify()

    def _handle_request_noblock(self) -> None:
        """Accept the next connection, unless ``max_pending`` are pending and moving: then it stays
        in the kernel's listen backlog, where waiting costs nothing, until one of them ends.

        In a reconnect storm the pending connections are agents waiting for a turn at the gate,
        and they end (authenticate) every few milliseconds: accepting more only to answer them
        503 would send them round their backoff (and come back at random later) while the
        connections already queued are served in order. When none has ended by itself for
        ``full_hold`` seconds (silent sockets holding the cap, not agents; being cut at the handshake
        deadline does not count), the next ones are refused with 503 as before.
        """
        with self._lock:
            if len(self._pending) >= self.max_pending and self.clock() - self._last_room < self.full_hold:
                self._room.wait(SWEEP_S)
                return
        super()._handle_request_noblock()

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 from the accepting thread; the socket is closed by a later sweep."""
        body = error_bytes(
            "server_busy", f"more than {self.max_pending} connections are waiting to authenticate; retry later"
        )
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {max(1, math.ceil(self.handshake_timeout))}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self._refused_count += 1
        if isinstance(request, ssl.SSLSocket):
            # No handshake yet, and none on the accepting thread: a send here would run one (and,
            # with the ClientHello already in, TLS 1.3 lets the 503 go out before the client's
            # Finished). Closed instead, as the module says; the agent retries with backoff.
            request.close()
            return
        try:
            request.setblocking(False)
            request.send(head + body)  # a few hundred bytes into an empty send buffer
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        # Closed after the peer has had time to read the answer (closing a socket with its
        # request unread would reset the connection and could lose the answer).
        self._refused.append((request, self.clock() + REFUSED_LINGER_S))
        while len(self._refused) > self.max_pending:
            self._refused.popleft()[0].close()

    def service_actions(self) -> None:
        """Each turn of the accept loop: cut pending connections past their deadline, close
        refused ones that have read their answer."""
        super().service_actions()
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_S
        with self._lock:
            expired = [s for s, deadline in self._pending.items() if deadline <= now]
            for s in expired:
                self._pending[s] = math.inf  # cut once; the handler thread releases it
        for s in expired:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the handler thread blocked reading headers
            except OSError:
                pass
        if expired:
            log.info(
                "agent plane: closed %d connection(s) silent past the %g s handshake timeout",
                len(expired),
                self.handshake_timeout,
            )
        if (self._refused_count or self._abandoned_count) and now >= self._next_report:
            self._next_report = now + REPORT_S
            if self._refused_count:
                log.warning(
                    "agent plane: refused %d connection(s) with 503: more than %d waiting to authenticate",
                    self._refused_count,
                    self.max_pending,
                )
            if self._abandoned_count:
                log.warning(
                    "agent plane: closed %d connection(s) whose agent had given up before they were accepted",
                    self._abandoned_count,
                )
            self._refused_count = self._abandoned_count = 0
        for _ in range(len(self._refused)):
            s, deadline = self._refused.popleft()
            if self._drained(s) or deadline <= now:
                s.close()
            else:
                self._refused.append((s, deadline))

    @staticmethod
    def _drained(s: socket.socket) -> bool:
        """Read what the refused peer sent; True once it has closed its side (or on error)."""
        try:
            for _ in range(4):
                if not s.recv(65536):
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        return False

    def server_close(self) -> None:
        self.closing = True
        super().server_close()
        with self._lock:
            pending = list(self._pending)
        for s in pending:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while self._refused:
            self._refused.popleft()[0].close()

    def handle_error(self, request, client_address):  # quieter than the default traceback dump
        log.debug("agent plane: error from %s", client_address, exc_info=True)
