"""A man-in-the-middle on the agent link: records every WebSocket frame and injects new ones.

Built on :class:`~tests.support.faultproxy.FaultProxy` (so artifact downloads through it can still
be cut, corrupted or stalled), it also parses the agent link in both directions. Frames are
forwarded whole and one at a time, so a frame the test injects always lands between two real
frames, as an attacker on the path would place it. What it can do:

- :meth:`FrameProxy.frames` — every text frame seen, per link and direction (``"down"`` is server
  to agent, ``"up"`` agent to server), decoded as JSON envelopes;
- :meth:`WsLink.inject` — send a text frame to the agent as if the server had sent it (replaying a
  captured ``command.update`` byte for byte, or into another host's link).

The agent link carries no extensions (no permessage-deflate), so a frame's payload is its text.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

from tests.support.faultproxy import FaultProxy, _shut

OP_TEXT = 0x1


class WsLink:
    """One agent WebSocket passing through the proxy."""

    def __init__(self, proxy: FrameProxy, index: int, token: str, agent_sock: socket.socket):
        self.proxy = proxy
        self.index = index
        self.token = token  # the agent token of the connection: which host this link belongs to
        self._agent_sock = agent_sock
        self._down_lock = threading.Lock()  # a frame to the agent is written whole, never interleaved
        self.down: list[str] = []
        self.up: list[str] = []
        self.closed = threading.Event()

    def drop(self) -> None:
        """Cut the link's TCP connection (both sides see it break, as on a network fault)."""
        _shut(self._agent_sock)

    def inject(self, text: str) -> None:
        """Send ``text`` to the agent as one unmasked text frame, as the server would."""
        with self._down_lock:
            self._agent_sock.sendall(encode_frame(OP_TEXT, text.encode()))
        self.proxy._note(self, "inject", text)

    def envelopes(self, direction: str = "down", type_: str | None = None) -> list[dict]:
        texts = self.down if direction == "down" else self.up
        out = []
        for t in list(texts):
            try:
                env = json.loads(t)
            except ValueError:
                continue
            if type_ is None or env.get("type") == type_:
                out.append(env)
        return out


class FrameProxy(FaultProxy):
    def __init__(self, upstream_port: int, **kwargs):
        super().__init__(upstream_port, **kwargs)
        self.links: list[WsLink] = []
        self.injected: list[tuple[int, str]] = []
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ queries

    def links_for(self, token: str) -> list[WsLink]:
        with self._cond:
            return [link for link in self.links if link.token == token]

    def live_link(self, token: str, timeout: float = 10.0) -> WsLink:
        """The newest open link of the agent with ``token`` (waits for one to be welcomed)."""

        def find():
            for link in reversed(self.links_for(token)):
                if not link.closed.is_set() and link.envelopes("down", "welcome"):
                    return link
            return None

        return self.wait(find, timeout, f"a welcomed link for token {token[:12]}")

    def wait(self, predicate, timeout: float = 10.0, what: str = "a frame"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def _note(self, link: WsLink, direction: str, text: str) -> None:
        with self._cond:
            if direction == "down":
                link.down.append(text)
            elif direction == "up":
                link.up.append(text)
            else:
                self.injected.append((link.index, text))
            self._cond.notify_all()

    # ------------------------------------------------------------------ the pipes

    def _pipe_up(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        buf = b""
        head_done = False
        try:
            while data := src.recv(65536):
                if head_done:
                    dst.sendall(data)
                    if conn.get("link") is not None:
                        buf = self._parse(buf + data, conn["link"], "up")
                    continue
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head_done = True
                head, rest = buf[: end + 4], buf[end + 4 :]
                conn["download"] = head.startswith(b"GET /agent/download/")
                if conn["download"]:
                    self.downloads += 1
                elif head.startswith(b"GET /ws/agent"):
                    with self._cond:
                        link = WsLink(self, len(self.links), _bearer(head), src)
                        self.links.append(link)
                    conn["link"] = link
                _ready(conn).set()
                dst.sendall(head + rest)
                buf = self._parse(rest, conn["link"], "up") if conn.get("link") is not None else b""
        except OSError:
            pass
        finally:
            _ready(conn).set()
            _shut(dst)
            link = conn.get("link")
            if link is not None:
                link.closed.set()
                with self._cond:
                    self._cond.notify_all()

    def _pipe_down(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        _ready(conn).wait(10)  # the request decides what this connection is
        link = conn.get("link")
        if link is None:
            return super()._pipe_down(src, dst, conn)
        buf = b""
        head_done = False
        try:
            while data := src.recv(65536):
                buf += data
                if not head_done:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    head_done = True
                    dst.sendall(buf[: end + 4])
                    buf = buf[end + 4 :]
                while (frame := _split_frame(buf)) is not None:
                    raw, opcode, payload, buf = frame
                    with link._down_lock:
                        dst.sendall(raw)
                    if opcode == OP_TEXT:
                        self._note(link, "down", payload.decode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            link.closed.set()
            _shut(dst)
            _shut(src)
            with self._cond:
                self._cond.notify_all()

    def _parse(self, buf: bytes, link: WsLink, direction: str) -> bytes:
        while (frame := _split_frame(buf)) is not None:
            _, opcode, payload, buf = frame
            if opcode == OP_TEXT:
                self._note(link, direction, payload.decode("utf-8", "replace"))
        return buf


def _ready(conn: dict) -> threading.Event:
    # both pipes start at once; setdefault is atomic, so they share one event
    return conn.setdefault("ready", threading.Event())


def _bearer(head: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode()
    return ""


def _split_frame(buf: bytes):
    """Split one whole frame off ``buf``: (raw bytes, opcode, unmasked payload, rest) or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    masked, n, pos = b1 & 0x80, b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        (n,) = struct.unpack("!H", buf[2:4])
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        (n,) = struct.unpack("!Q", buf[2:10])
        pos = 10
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key, pos = buf[pos : pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos : pos + n]
    if masked:
        payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
    return buf[: pos + n], b0 & 0x0F, payload, buf[pos + n :]


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (server to client)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload
