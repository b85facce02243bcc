"""A scripted agent: speaks the real protocol over a real socket, but its moves are the test's.

Used where a test needs to choose exactly what an agent reports and when (progress, a failure,
coming back at some version); the end-to-end tests use the real agent program instead.
"""

from __future__ import annotations

import queue
import socket
import threading

import simple_websocket

from agent import protocol


class ScriptedAgent:
    ws_options: dict = {}  # more simple_websocket.Client.connect() arguments (a bench's event_class)

    def __init__(self, ws_url: str, token: str, version: str, capabilities=("update",), ssl_context=None):
        self.ws_url = ws_url
        self.ssl_context = ssl_context  # for a wss:// server: the context that trusts its certificate
        self.token = token
        self.version = version
        self.capabilities = list(capabilities)
        self.hello_extra: dict = {}  # more hello fields (e.g. update_unavailable)
        self.inbox: queue.Queue[protocol.Envelope] = queue.Queue()
        self.ws = None
        self._reader: threading.Thread | None = None

    def connect(self, version: str | None = None, last_update: dict | None = None) -> protocol.Envelope:
        """Open the socket, say hello (at ``version``), and return the server's welcome."""
        if version is not None:
            self.version = version
        self.ws = simple_websocket.Client.connect(
            self.ws_url + "/ws/agent",
            headers={"Authorization": f"Bearer {self.token}"},
            ssl_context=self.ssl_context,
            **self.ws_options,
        )
        # A frame and the ping after it go out at once, not held by Nagle until the server's
        # delayed ACK (~40 ms per round trip on Linux): tests send thousands of such pairs.
        self.ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(
            "hello",
            agent_version=self.version,
            os="linux",
            arch="x86_64",
            hostname="scripted",
            python="3.11",
            capabilities=self.capabilities,
            boot_id="scripted-boot",
            last_update=last_update,
            **self.hello_extra,
        )
        ws = self.ws
        self._reader = threading.Thread(target=self._read, args=(ws,), daemon=True)
        self._reader.start()
        welcome = self.expect("welcome")
        return welcome

    def _read(self, ws) -> None:
        try:
            while True:
                raw = ws.receive()
                if raw is None:
                    return
                arrival = self._arrival(ws)
                env = protocol.decode(raw)
                if env.type == "ping":
                    self.send("pong", ref=env.id)
                    continue
                self.inbox.put(env if arrival is None else (arrival, env))
        except (simple_websocket.ConnectionClosed, protocol.ProtocolError):
            return

    def _arrival(self, ws):
        """What to keep beside each message in the inbox (called once per message received);
        None keeps the bare envelope. A bench's subclass returns when the message arrived."""
        return None

    def send(self, type_: str, **data) -> None:
        self.ws.send(protocol.encode(type_, data))

    def expect(self, type_: str, timeout: float = 5.0) -> protocol.Envelope:
        env = self.inbox.get(timeout=timeout)
        assert env.type == type_, f"expected {type_}, got {env.type}: {env.data}"
        return env

    def disconnect(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except simple_websocket.ConnectionClosed:
                pass
            self.ws = None
