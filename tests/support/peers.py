"""Fakes of the agent's counterparts for the agent tests: a minimal agent plane (``PeerServer``),
an artifact server with switchable misbehaviour, a peer that dispatches one update, and a runner
for an in-process Agent."""

from __future__ import annotations

import http.server
import queue
import socket
import ssl
import threading
import time

import simple_websocket

from agent import protocol


class _DaemonThread(threading.Thread):
    def __init__(self, *args, **kwargs):
        kwargs["daemon"] = True
        super().__init__(*args, **kwargs)


class PeerConnection:
    """The server side of one agent connection, with helpers to exchange envelopes."""

    def __init__(self, ws, headers: dict[str, str]):
        self.ws = ws
        self.headers = headers

    def recv(self, timeout: float = 3.0) -> protocol.Envelope:
        frame = self.ws.receive(timeout=timeout)
        if frame is None:
            raise AssertionError(f"no frame within {timeout} s")
        return protocol.decode(frame)

    def recv_type(self, type_: str, timeout: float = 3.0, skip=("heartbeat",)) -> protocol.Envelope:
        while True:
            env = self.recv(timeout)
            if env.type == type_:
                return env
            if env.type not in skip:
                raise AssertionError(f"expected {type_}, got {env.type}: {env.data}")

    def send(self, type_: str, data: dict | None = None, id_: str | None = None) -> str:
        id_ = id_ or protocol.new_id()
        self.ws.send(protocol.encode(type_, data, id_))
        return id_

    def send_raw(self, frame: str) -> None:
        self.ws.send(frame)

    def welcome(self, heartbeat_s: float = 30, server_version: str = "9.9.9") -> None:
        self.send("welcome", {"server_version": server_version, "heartbeat_s": heartbeat_s})

    def close(self, code: int = protocol.CLOSE_NORMAL, message: str | None = None) -> None:
        try:
            self.ws.close(reason=code, message=message)
        except simple_websocket.ConnectionClosed:
            pass


class PeerServer:
    """A minimal agent plane: accepts WebSocket upgrades and runs ``handler(conn)`` per connection."""

    def __init__(self, handler):
        self.handler = handler
        self.reject_status: int | None = None
        self.connections: list[PeerConnection] = []
        self.errors: list[BaseException] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self._closing = False
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the real agent plane does
            self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket):
        try:
            client.settimeout(5)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = client.recv(4096)
                if not chunk:
                    return
                raw += chunk
            lines = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if self.reject_status:
                client.sendall(f"HTTP/1.1 {self.reject_status} Refused\r\nContent-Length: 0\r\n\r\n".encode())
                return
            client.settimeout(None)
            environ = {"werkzeug.socket": client, "PATH_INFO": lines[0].split(" ")[1]}
            for name, value in headers.items():
                environ["HTTP_" + name.upper().replace("-", "_")] = value
            ws = simple_websocket.Server.accept(environ, thread_class=_DaemonThread)
            conn = PeerConnection(ws, headers)
            conn.path = environ["PATH_INFO"]
            self.connections.append(conn)
            self.handler(conn)
        except (simple_websocket.ConnectionClosed, OSError, AssertionError) as exc:
            self.errors.append(exc)
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def close(self):
        self._closing = True
        self.sock.close()
        for client in self._clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ArtifactServer:
    """Serve artifact bytes over HTTP (or https, given a ``tests.support.pki`` KeyPair) on
    127.0.0.1:0, with switchable misbehaviour."""

    def __init__(self, body: bytes, token: str = "tok", tls=None):
        self.body = body
        self.token = token
        self.scheme = "https" if tls else "http"
        self.mode = "ok"  # ok | truncate | oversize | stall | wrong-length
        self.requests: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.body
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if outer.mode == "oversize":
                    self.send_header("Connection", "close")  # no length: the body runs to EOF
                    self.end_headers()
                    self.wfile.write(body + b"x" * 1000)
                    self.close_connection = True
                    return
                length = len(body) + 5 if outer.mode == "wrong-length" else len(body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if outer.mode in ("truncate", "stall"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if outer.mode == "stall":
                        outer.release.wait(5)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/agent/download/2.0.0") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class AgentThread:
    """Run an Agent's main loop in a thread; always stopped at teardown."""

    def __init__(self, agent):
        self.agent = agent
        self.result: queue.Queue[int] = queue.Queue()
        self.thread = threading.Thread(target=lambda: self.result.put(agent.run()), daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> int:
        self.agent.request_stop()
        return self.wait(timeout)

    def wait(self, timeout: float = 2.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not return in time"
        return self.result.get_nowait()


class UpdatePeer:
    """A fake agent plane that dispatches one ``command.update`` to the first 1.0.0 agent it sees.

    ``welcome_if(hello_data)`` decides whether a hello is welcomed (a hello that is not is held
    open without an answer: the server "never sees" that agent). Every hello, progress and
    result goes to ``events``.
    """

    def __init__(self, peer_factory, command: dict | None, welcome_if=lambda hello: True):
        self.command = command
        self.welcome_if = welcome_if
        self.events: queue.Queue = queue.Queue()
        self.hellos: list[dict] = []
        self.reports: list[tuple[str, dict]] = []  # every update.progress / update.result, in order
        self.dispatched = False
        self.server = peer_factory(self._handle)
        self.url = self.server.url

    def _handle(self, conn):
        hello = conn.recv_type("hello")
        self.hellos.append(hello.data)
        self.events.put(("hello", hello.data))
        if not self.welcome_if(hello.data):
            while True:  # hold the link open without a welcome until the agent gives up
                conn.ws.receive(timeout=60)
        conn.welcome(heartbeat_s=0.2, server_version="2.0.0")
        if self.command and not self.dispatched and hello.data["agent_version"] == "1.0.0":
            self.dispatched = True
            conn.send("command.update", self.command)
        while True:
            env = conn.recv(timeout=60)
            if env.type in ("update.progress", "update.result"):
                self.reports.append((env.type, env.data))
                self.events.put((env.type, env.data))

    def phases(self) -> list[str]:
        out: list[str] = []
        for kind, data in self.reports:
            if kind == "update.progress" and (not out or out[-1] != data["phase"]):
                out.append(data["phase"])
        return out

    def results(self) -> list[dict]:
        return [data for kind, data in self.reports if kind == "update.result"]

    def next_hello(self, timeout: float = 20.0, host=None) -> dict:
        """Return the next hello's data, skipping progress and result events."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                kind, data = self.events.get(timeout=max(0.01, remaining))
            except queue.Empty:
                log = host.log() if host is not None else ""
                raise AssertionError(f"no hello within {timeout} s; agent log:\n{log[-6000:]}") from None
            if kind == "hello":
                return data


def update_command(build, job_id: str = "job-1", **overrides) -> dict:
    """The ``command.update`` data for a BuildResult, carrying its signature."""
    data = {
        "job_id": job_id,
        "version": build.version,
        "url": "http://127.0.0.1:9/unset",
        "sha256": build.sha256,
        "size": build.size,
        "platform": build.platform,
        "signature": build.signature,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}
