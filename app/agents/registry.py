"""The live connection registry: host id -> the one socket that host is connected on.

It is a cache of who is connected *to this process*; the database's ``hosts.connected`` is the
record. The registry lock guards only the dict: no socket I/O happens while it is held.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import socket
import ssl
import sys
import threading
import time

from wsproto.events import CloseConnection

from agent import protocol

log = logging.getLogger(__name__)

_conn_ids = itertools.count(1)
#: What a muted socket's reader waits for: more than any agent sends while a server exits.
MUTED_RCVLOWAT = 1 << 30


class Connection:
    """One agent's WebSocket, with a lock that serializes writes from several threads."""

    def __init__(self, host_id: int, ws, remote: str = ""):
        self.id = next(_conn_ids)
        self.host_id = host_id
        self.ws = ws
        self.remote = remote
        self.connected_at = time.monotonic()
        self.agent_version: str | None = None
        #: Why the agent cannot update itself, as its hello said (None: it can, or it is too old to say).
        self.update_unavailable: str | None = None
        self._send_lock = threading.Lock()
        self._pongs: dict[str, threading.Event] = {}
        self._pong_lock = threading.Lock()
        self.closed = threading.Event()
        #: Set once the hello has been reconciled with the host's update and the fleet and the read
        #: loop runs: what a caller (a test) waits for before it starts something new on this host.
        self.settled = threading.Event()

    def send(self, frame: str) -> bool:
        """Send one text frame; return False if the socket is gone."""
        try:
            with self._send_lock:
                self.ws.send(frame)
            return True
        except Exception:  # noqa: BLE001 - any transport failure means "not delivered"
            log.info("send to host %s failed; connection is gone", self.host_id)
            return False

    def close(self, code: int = protocol.CLOSE_NORMAL, reason: str = "") -> None:
        self.closed.set()
        try:
            self.ws.close(reason=code, message=reason)
        except Exception:  # noqa: BLE001 - closing an already-dead socket is fine
            pass

    def mute(self) -> None:
        """Let nothing the agent sends wake this socket's reader thread any more (a process about to exit).

        A raised ``SO_RCVLOWAT`` keeps a reader blocked in ``recv`` asleep while less than that has
        arrived (Linux 4.20 and later; an older kernel wakes it as before).
        """
        sock = getattr(self.ws, "sock", None)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, MUTED_RCVLOWAT)
        except (AttributeError, OSError):  # no socket, or already closed: nothing will wake it
            pass

    def ping(self, timeout: float) -> float | None:
        """Round-trip one ``ping``; return seconds, or None when no pong came in time."""
        frame_id = protocol.new_id()
        ev = threading.Event()
        with self._pong_lock:
            self._pongs[frame_id] = ev
        t0 = time.perf_counter()
        try:
            if not self.send(protocol.encode("ping", {}, frame_id)):
                return None
            if not ev.wait(timeout):
                return None
            return time.perf_counter() - t0
        finally:
            with self._pong_lock:
                self._pongs.pop(frame_id, None)

    def pong(self, ref: str) -> None:
        with self._pong_lock:
            ev = self._pongs.get(ref)
        if ev is not None:
            ev.set()


def _close_holding_the_gil(conns: list[Connection], code: int, reason: str) -> list[Connection]:
    """Send each plain socket its close frame without letting go of the GIL; return the others.

    For a process about to exit. Muted readers still wake when an agent, having answered the close,
    closes its TCP side; ``socket.send`` lets go of the GIL around every write, and the stopping
    thread then queued for it behind every thread it had woken (a stop of 2,415 sockets overran
    its 9 s watchdog). Here the frames go out through libc's ``send`` called with the GIL held
    (``ctypes.PyDLL``), non-blocking, with Python's switch interval raised for the rest of the
    process's life: a few milliseconds for thousands of sockets, after which the caller exits
    without letting go of the GIL (``app.serve.serve``). A TLS socket, or a send that does not go through at
    once, is left to :meth:`Connection.close`; a frame cut short leaves the agent an ended
    connection, which it reconnects after as well.
    """
    try:
        libc_send = ctypes.PyDLL(None).send
    except (OSError, AttributeError):  # no libc symbols to call: the ordinary close
        return conns
    libc_send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    libc_send.restype = ctypes.c_ssize_t
    flags = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
    rest = []
    # Raised for good: the process exits right after, and until then no other thread may take
    # the GIL from this one (a forced switch would leave it queueing behind the woken threads).
    sys.setswitchinterval(60.0)
    for c in conns:
        ws = c.ws
        sock = getattr(ws, "sock", None)
        if sock is None or isinstance(sock, ssl.SSLSocket) or not getattr(ws, "connected", False):
            rest.append(c)
            continue
        try:
            frame = ws.ws.send(CloseConnection(code, reason))
        except Exception:  # noqa: BLE001 - a protocol state that cannot close now: the ordinary way
            rest.append(c)
            continue
        c.closed.set()
        ws.connected = False
        libc_send(sock.fileno(), frame, len(frame), flags)
    return rest


class ConnectionRegistry:
    """Thread-safe map of host id to its current :class:`Connection`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_host: dict[int, Connection] = {}

    def register(self, conn: Connection) -> Connection | None:
        """Make ``conn`` the host's connection; return the one it replaces (caller closes it)."""
        with self._lock:
            old = self._by_host.get(conn.host_id)
            self._by_host[conn.host_id] = conn
        return old if old is not conn else None

    def unregister(self, conn: Connection) -> bool:
        """Forget ``conn`` if it is still the host's current one; return whether it was."""
        with self._lock:
            if self._by_host.get(conn.host_id) is conn:
                del self._by_host[conn.host_id]
                return True
        return False

    def get(self, host_id: int) -> Connection | None:
        with self._lock:
            return self._by_host.get(host_id)

    def is_connected(self, host_id: int) -> bool:
        with self._lock:
            return host_id in self._by_host

    def host_ids(self) -> set[int]:
        with self._lock:
            return set(self._by_host)

    def send(self, host_id: int, frame: str) -> bool:
        conn = self.get(host_id)
        return conn.send(frame) if conn else False

    def close(self, host_id: int, code: int, reason: str = "") -> bool:
        with self._lock:
            conn = self._by_host.pop(host_id, None)
        if conn is None:
            return False
        conn.close(code, reason)
        return True

    def close_all(
        self,
        code: int = protocol.CLOSE_GOING_AWAY,
        reason: str = protocol.going_away_reason(None),
        exiting: bool = False,
    ) -> int:
        """Close every socket. ``exiting``: the process exits right after, so the sockets' own threads
        need not wake for the agents' answers (:meth:`Connection.mute`) and are muted first: with
        thousands of them woken, this thread waited for the GIL after every send (8.65 s for 2,585
        sockets in one 10,000-agent restart; the process leaves anyway)."""
        with self._lock:
            conns = list(self._by_host.values())
            self._by_host.clear()
        rest = conns
        if exiting:
            for c in conns:
                c.mute()
            rest = _close_holding_the_gil(conns, code, reason)
        for c in rest:
            c.close(code, reason)
        return len(conns)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_host)
