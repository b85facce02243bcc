"""The agent's link to the server: the WebSocket client, one live connection, the reconnect backoff.

:class:`WebSocketClient` is simple-websocket's client with connect and handshake timeouts;
:func:`default_connect` opens the authenticated link; :class:`Link` wraps one live connection so
the main and update threads can send on it and it always closes cleanly; :class:`Backoff` spaces
the reconnects. The session on top of the link (hello, welcome, heartbeats, commands) is
:mod:`agent.client`.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import simple_websocket
from simple_websocket.errors import ConnectionClosed
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.utilities import LocalProtocolError

from agent import protocol
from agent.tls import client_context

BACKOFF_BASE_S = 0.5
#: After the server closed the link as going away (1001: it is shutting down, usually to restart),
#: a connect *refused* (nothing listens yet) is retried within this many seconds, full jitter,
#: without climbing the ladder. 4 s spreads a fleet's return over the first seconds of the new
#: server: at the ~150-250 handshakes/s of a loaded 2-core server, 2,000 agents arriving within
#: 2 s waited past their 10 s connect timeout in its listen backlog (docs/capacity.md)...
RESTART_RETRY_S = 4.0
#: ...for at most this long after the close; then refusals climb the ladder as usual.
RESTART_WINDOW_S = 60.0
CONNECT_TIMEOUT_S = 10.0
#: How long a graceful close waits for the server's closing handshake before dropping the socket.
CLOSE_WAIT_S = 0.5


class Backoff:
    """Full-jitter exponential backoff: each delay is uniform in [0, min(cap, base * 2**attempt)].

    One exception, for a server restart: after :meth:`server_going_away` (the server closed the
    link with 1001), a connect that is *refused* (the port is closed: the server is not back yet)
    is retried after a delay uniform in [0, min(cap, RESTART_RETRY_S)] and does not climb the
    ladder, for RESTART_WINDOW_S. Climbing while nothing listened put every agent of a 2,000-agent
    fleet at the 10 s ceiling by the time the new server listened, so the reconnect storm took the
    ceiling on top of the restart (docs/capacity.md). A refused connect costs the server nothing
    (the kernel answers it), the delays keep their full jitter (the fleet arrives spread over
    RESTART_RETRY_S, not at once), and anything else (a 503, a timeout, a reset: a server that is
    up but busy) still climbs the ladder.

    When the 1001's reason names a window (``reconnect within 15.0 s``,
    :func:`agent.protocol.reconnect_spread`), the agent spreads its return over it: the first
    attempt comes at a uniform point of the window, and a refused one is retried at a uniform point
    of what is left of it (or within RESTART_RETRY_S, whichever is longer), so the fleet reaches
    the new server evenly across the part of the window it is up for. The server names a window
    when it held more agents than it welcomes within an agent's connect timeout: arriving all
    within 4 s, a third of 10,000 agents on 4 workers waited in the listen queues past that
    timeout and came back again (docs/capacity.md, issue 13).
    """

    def __init__(
        self,
        base: float = BACKOFF_BASE_S,
        cap: float = 30.0,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base = base
        self.cap = cap
        self.rand = rand
        self.clock = clock
        self.attempt = 0
        self._restart_until: float | None = None
        self._spread_until: float | None = None
        self._spread_next = False

    def ceiling(self) -> float:
        return min(self.cap, self.base * (2 ** min(self.attempt, 62)))

    def next_delay(self, refused: bool = False) -> float:
        """Return the next delay and move one step up the ladder (see the class for ``refused``)."""
        if self.restarting:
            left = 0.0 if self._spread_until is None else max(0.0, self._spread_until - self.clock())
            if self._spread_next:  # the first attempt after the close: anywhere in the named window
                self._spread_next = False
                if left > 0:
                    return self.rand() * left
            if refused:
                return self.rand() * max(min(self.cap, RESTART_RETRY_S), left)
        delay = self.rand() * self.ceiling()
        self.attempt += 1
        return delay

    def server_going_away(self, spread: float | None = None) -> None:
        """The server closed the link as going away (1001): it is probably restarting. ``spread``:
        the window its close reason named for the fleet's return, if any."""
        now = self.clock()
        spread = spread if spread is not None and spread > 0 else None
        self._restart_until = now + max(RESTART_WINDOW_S, (spread or 0.0) + RESTART_RETRY_S)
        self._spread_until = None if spread is None else now + spread
        self._spread_next = spread is not None

    @property
    def restarting(self) -> bool:
        """Within the restart window opened by :meth:`server_going_away`."""
        return self._restart_until is not None and self.clock() < self._restart_until

    def reset(self) -> None:
        """Start the ladder again (a welcome, or a connection that lived long enough)."""
        self.attempt = 0
        self._restart_until = None
        self._spread_until = None
        self._spread_next = False


class _DaemonThread(threading.Thread):
    # simple-websocket's reader thread must never keep the process alive after the main loop ends
    def __init__(self, *args, **kwargs):
        kwargs["daemon"] = True
        super().__init__(*args, **kwargs)


class WebSocketClient(simple_websocket.Client):
    """simple-websocket's client with a connect and handshake timeout.

    The stock client connects and reads the handshake answer with no timeout, and spins forever
    if the server closes the socket before answering; a service must not hang there.
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        timeout: float = CONNECT_TIMEOUT_S,
        max_message_size: int | None = protocol.MAX_FRAME_BYTES,
        server_ca: str | None = None,
    ):
        parts = urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        self.host = parts.hostname
        self.port = parts.port or (443 if secure else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.subprotocols = []
        self._headers = list(headers.items())
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            # Small frames sent back to back (progress, result, close) must not wait for the
            # server's delayed ACK (Nagle): that cost ~40 ms per burst on the update path.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if secure:
                # verified (chain and name) before a byte of HTTP, so the token never reaches an impostor
                sock = client_context(server_ca).wrap_socket(sock, server_hostname=self.host)
            simple_websocket.ws.Base.__init__(
                self,
                sock,
                connection_type=ConnectionType.CLIENT,
                max_message_size=max_message_size,
                thread_class=_DaemonThread,
            )
        except BaseException:
            sock.close()
            raise

    def handshake(self):
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        self.sock.sendall(self.ws.send(Request(host=host, target=self.path, extra_headers=self._headers)))
        event = None
        while event is None:
            data = self.sock.recv(self.receive_bytes)
            if not data:
                raise simple_websocket.ConnectionError(None)
            self.ws.receive_data(data)
            event = next(iter(self.ws.events()), None)
        if isinstance(event, RejectConnection):
            raise simple_websocket.ConnectionError(event.status_code)
        if not isinstance(event, AcceptConnection):
            raise simple_websocket.ConnectionError(400)
        self.sock.settimeout(None)  # the reader thread blocks in recv from here on
        self.connected = True
        # frames that arrived together with the handshake answer are already buffered in wsproto
        self.connected = self._handle_events()


def default_connect(url: str, token: str, server_ca: str | None = None) -> WebSocketClient:
    """Open the WebSocket link to ``url`` authenticated with ``token``; a ``wss://`` server must
    present a certificate that verifies against ``server_ca`` (or the system store)."""
    return WebSocketClient(url, headers={"Authorization": f"Bearer {token}"}, server_ca=server_ca)


class Link:
    """One live connection: serialises sends from the main and update threads."""

    def __init__(self, ws):
        self.ws = ws
        self._lock = threading.Lock()

    def send(self, frame: str) -> None:
        with self._lock:
            try:
                self.ws.send(frame)
            except LocalProtocolError:
                # The socket is already closing (the peer or our reader closed it first): to the
                # caller that is the same as a closed link, not a surprise.
                raise ConnectionClosed() from None

    def receive(self, timeout: float) -> str | bytes | None:
        return self.ws.receive(timeout=timeout)

    @property
    def close_code(self) -> int | None:
        code = getattr(self.ws, "close_reason", None)
        return int(code) if code is not None else None

    @property
    def close_message(self) -> str | None:
        return getattr(self.ws, "close_message", None)

    @property
    def reconnect_spread(self) -> float | None:
        """The return window the server named when it closed this link as going away (1001), if any."""
        if self.close_code != protocol.CLOSE_GOING_AWAY:
            return None
        return protocol.reconnect_spread(self.close_message)

    def close(self, code: int = protocol.CLOSE_NORMAL, message: str | None = None) -> None:
        """Close gracefully when possible; always release the socket and the reader thread."""
        with self._lock:
            if getattr(self.ws, "connected", False):
                try:
                    self.ws.close(reason=code, message=message)
                except (ConnectionClosed, LocalProtocolError, OSError):
                    pass  # already closing or gone: nothing left to say to the peer
            thread = getattr(self.ws, "thread", None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(CLOSE_WAIT_S)
            sock = getattr(self.ws, "sock", None)
            if sock is not None:
                try:
                    # shutdown wakes a reader blocked in recv; close alone does not on Linux
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
